"""The proxy's OpenAPI document says what the API answers: every error is
`{"error": reason}`, bodies are refused with 400 (never FastAPI's 422), and the edge's own
statuses (rate limit, core unavailable, body limit) appear on every route they apply to."""
from __future__ import annotations

from schemas.http import ErrorResponse

ERROR_MEANINGS = {
    400: "invalid request, or refused by the core (`{\"error\": reason}`)",
    401: "unauthenticated: a wrong, reused or stale code, a bad signature, an invalid or expired token or cookie",
    403: "not allowed",
    409: "conflict",
    413: "request body too large",
    428: "mobile approval or the browser login not completed yet",
    429: "too many requests or failed attempts (with Retry-After)",
    503: "core or NATS unavailable",
}
# What the edge adds to every route under /api/v1 but health (the rate limit, the core
# behind it) and to every one that takes a body (its validation and size limit).
EDGE_ERRORS = (429, 503)
BODY_ERRORS = (400, 413)
UNLIMITED_PATHS = ("/api/v1/health",)


def errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI responses of a route's own error statuses, all `{"error": reason}` (the
    edge's are added to every route by the document itself)."""
    return {status: _error_response(status) for status in statuses}


def _error_response(status: int) -> dict:
    return {"model": ErrorResponse, "description": ERROR_MEANINGS[status]}


def document_edge_errors(schema: dict) -> None:
    """FastAPI documents 422 for every body; this API answers 400. And every route answers
    the edge's statuses, whoever wrote it."""
    error_schema = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            added = (*(EDGE_ERRORS if path.startswith("/api/v1/") and path not in UNLIMITED_PATHS else ()),
                     *(BODY_ERRORS if "requestBody" in operation else ()))
            for status in added:
                responses.setdefault(str(status), {"description": ERROR_MEANINGS[status], "content": error_schema})
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components.setdefault("ErrorResponse", ErrorResponse.model_json_schema())
