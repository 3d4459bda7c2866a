"""The proxy's OpenAPI document says what the API answers: every error is
`{"error": reason}`, bodies are refused with 400 (never FastAPI's 422), and the edge's own
statuses (rate limit, core unavailable, body limit) appear on every route they apply to.

The checked-in copy, docs/openapi.json, is regenerated with
`python -m proxy_service.openapi --write docs/openapi.json`."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

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


def render(document: dict) -> str:
    """The checked-in form of the document: sorted keys, two-space indent, a final newline,
    so that the same code always writes the same bytes."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


async def served_document() -> dict:
    """The document exactly as the proxy serves it at /api/v1/openapi.json, fetched through
    the application itself (no server, no NATS: the route needs neither)."""
    import httpx

    from proxy_service.app import create_app
    from proxy_service.settings import ProxySettings

    app = create_app(ProxySettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
        response = await client.get("/api/v1/openapi.json")
        response.raise_for_status()
        return response.json()


def main(argv: list[str] | None = None) -> None:
    """`python -m proxy_service.openapi > docs/openapi.json` (or `--write docs/openapi.json`)."""
    parser = argparse.ArgumentParser(prog="python -m proxy_service.openapi", description=__doc__)
    parser.add_argument("--write", metavar="FILE", type=Path, help="write the document to FILE instead of stdout")
    args = parser.parse_args(argv)
    text = render(asyncio.run(served_document()))
    if args.write:
        args.write.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
