"""Enrollment routes for Defguard's desktop and mobile apps, `/api/v1/poll`, and the
version headers the apps check on every response.

The proxy keeps no state: the enrollment cookie's value is sealed by the core (any core
opens it), handed to the app as `defguard_proxy`, and passed back to the core, sealed to
its RPC key, on every later step. So a session started on one proxy goes on on any other.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import timezone
from email.utils import format_datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from events import subjects
from schemas.sealing import seal
from proxy_service.core_client import BusHolder, CoreClient
from proxy_service.openapi import errors
from proxy_service.settings import ProxySettings
from schemas import rpc
from schemas.http import (
    ActivateUserRequest,
    CodeMfaSetupFinishRequest,
    CodeMfaSetupStartRequest,
    EnrollmentStartRequest,
    ExistingDeviceRequest,
    InstanceInfoRequest,
    NewDeviceRequest,
    RegisterMobileRequest,
)

COOKIE_NAME = "defguard_proxy"
# The Defguard API level these routes implement; the apps compare it with their own
# minimum (1.6.0) and warn about a version mismatch below it.
DEFGUARD_COMPATIBLE_VERSION = "1.6.0"


class DefguardHeaders:
    """Adds `defguard-core-version`, `defguard-component-version` and
    `defguard-core-connected` to every HTTP response, errors from the outer layers
    (413, 429) included."""

    def __init__(self, app: ASGIApp, holder: BusHolder) -> None:
        self.app = app
        self.holder = holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                connected = self.holder.bus is not None and self.holder.bus.connected
                message["headers"] = [
                    *message.get("headers", []),
                    (b"defguard-core-version", DEFGUARD_COMPATIBLE_VERSION.encode()),
                    (b"defguard-component-version", DEFGUARD_COMPATIBLE_VERSION.encode()),
                    (b"defguard-core-connected", b"true" if connected else b"false"),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


def instance_info(settings: ProxySettings, instance_id: str, name: str, username: str) -> dict[str, Any]:
    url = settings.public_url.rstrip("/")
    return {
        "id": instance_id,
        "name": name,
        "url": url,
        "proxy_url": url + "/",  # the desktop appends "api/v1/…" to it
        "username": username,
        "enterprise_enabled": False,
        "disable_all_traffic": False,
        "openid_display_name": None,
        "client_traffic_policy": 0,
    }


def create_router(
    settings: ProxySettings, core: CoreClient, client_info: Callable[[Request], rpc.ClientInfo]
) -> APIRouter:
    router = APIRouter(prefix="/api/v1")
    secure_cookie = settings.public_url.lower().startswith("https://")

    async def call(subject: str, request: Any, result_type: type) -> Any:
        return await core.bus.call(subject, request, result_type, timeout=core.timeout_s)

    async def session_fields(request: Request) -> dict[str, Any]:
        cookie = request.cookies.get(COOKIE_NAME)
        sealed = seal(await core.core_key(), cookie) if cookie else None
        return {"cookie_sealed": sealed, "client": client_info(request)}

    def device_config(result: rpc.AppDeviceConfigResult) -> dict[str, Any]:
        return {
            "device": result.device.model_dump(),
            "configs": [c.model_dump() for c in result.configs],
            "instance": instance_info(settings, result.instance_id, result.instance_name, result.username),
            "token": core.reply_key.open(result.token_sealed),
        }

    @router.post("/enrollment/start", responses=errors(401))
    async def enrollment_start(body: EnrollmentStartRequest, request: Request) -> JSONResponse:
        sealed = seal(await core.core_key(), body.token)
        result: rpc.EnrollStartResult = await call(
            subjects.RPC_ENROLL_START,
            rpc.EnrollStartRequest(token_sealed=sealed, client=client_info(request), reply_key=core.reply_key.public),
            rpc.EnrollStartResult,
        )
        user = result.user
        response = JSONResponse({
            "admin": {"name": f"{result.instance_name} administrator", "phone_number": None, "email": ""},
            "user": {
                "first_name": user.username,
                "last_name": "",
                "login": user.username,
                "email": user.email,
                "phone_number": None,
                "is_active": user.is_active,
                "device_names": user.device_names,
                "enrolled": user.enrolled,
                "is_admin": False,
            },
            "deadline_timestamp": int(result.deadline.timestamp()),
            "final_page_content": f"Your device is ready: connect to {result.instance_name} from the app.",
            "instance": instance_info(settings, result.instance_id, result.instance_name, user.username),
            "settings": {
                "vpn_setup_optional": False,
                "only_client_activation": True,
                "admin_device_management": False,
                "smtp_configured": result.smtp_configured,
                "mfa_required": True,
            },
        })
        # Set by hand: Starlette's set_cookie would quote the value; the apps send it back verbatim.
        attributes = [
            f"{COOKIE_NAME}={core.reply_key.open(result.cookie_sealed)}",
            f"Expires={format_datetime(result.deadline.astimezone(timezone.utc), usegmt=True)}",
            "Path=/",
            "HttpOnly",
            "SameSite=Strict",
        ]
        if secure_cookie:
            attributes.append("Secure")
        response.headers.append("set-cookie", "; ".join(attributes))
        return response

    @router.post("/enrollment/register-mfa/code/start", responses=errors(401, 403))
    async def register_mfa_start(body: CodeMfaSetupStartRequest, request: Request) -> JSONResponse:
        result: rpc.EnrollFactorStartResult = await call(
            subjects.RPC_ENROLL_FACTOR_START,
            rpc.EnrollFactorStartRequest(**await session_fields(request), method=body.method,
                                         reply_key=core.reply_key.public),
            rpc.EnrollFactorStartResult,
        )
        secret = core.reply_key.open(result.totp_secret_sealed) if result.totp_secret_sealed else None
        return JSONResponse({"totp_secret": secret})

    @router.post("/enrollment/register-mfa/code/finish", responses=errors(401, 403))
    async def register_mfa_finish(body: CodeMfaSetupFinishRequest, request: Request) -> JSONResponse:
        await call(
            subjects.RPC_ENROLL_FACTOR_FINISH,
            rpc.EnrollFactorFinishRequest(**await session_fields(request), code_sealed=seal(await core.core_key(), body.code)),
            rpc.Empty,
        )
        return JSONResponse({"recovery_codes": []})  # wgmfa has no recovery codes

    @router.post("/enrollment/activate_user", responses=errors(401, 403))
    async def activate_user(_body: ActivateUserRequest, request: Request) -> Response:
        await call(subjects.RPC_ENROLL_ACTIVATE, rpc.EnrollSession(**await session_fields(request)), rpc.Empty)
        response = Response(status_code=200)
        response.delete_cookie(COOKIE_NAME, path="/", secure=secure_cookie, httponly=True, samesite="strict")
        return response

    @router.post("/enrollment/create_device", responses=errors(401, 403))
    async def create_device(body: NewDeviceRequest, request: Request) -> JSONResponse:
        result = await call(
            subjects.RPC_ENROLL_CREATE_DEVICE,
            rpc.EnrollCreateDeviceRequest(**await session_fields(request), name=body.name, pubkey=body.pubkey,
                                          reply_key=core.reply_key.public),
            rpc.AppDeviceConfigResult,
        )
        return JSONResponse(device_config(result))

    @router.post("/enrollment/network_info", responses=errors(401, 403))
    async def network_info(body: ExistingDeviceRequest, request: Request) -> JSONResponse:
        result = await call(
            subjects.RPC_ENROLL_NETWORK_INFO,
            rpc.EnrollNetworkInfoRequest(**await session_fields(request), pubkey=body.pubkey,
                                         reply_key=core.reply_key.public),
            rpc.AppDeviceConfigResult,
        )
        return JSONResponse(device_config(result))

    @router.post("/enrollment/register_mobile", responses=errors(401, 403, 409))
    async def register_mobile(body: RegisterMobileRequest, request: Request) -> Response:
        fields = await session_fields(request)
        code = seal(await core.core_key(), body.code) if body.code else None
        await call(
            subjects.RPC_ENROLL_MOBILE,
            rpc.RegisterMobileRequest(auth_pub_key=body.auth_pub_key, device_pub_key=body.device_pub_key,
                                      code_sealed=code, **fields),
            rpc.Empty,
        )
        return Response(status_code=200)

    @router.post("/poll", responses=errors(403))
    async def poll(body: InstanceInfoRequest, request: Request) -> JSONResponse:
        result = await call(
            subjects.RPC_ENROLL_POLL,
            rpc.PollRequest(token_sealed=seal(await core.core_key(), body.token), client=client_info(request),
                            reply_key=core.reply_key.public),
            rpc.AppDeviceConfigResult,
        )
        return JSONResponse({"device_config": device_config(result)})

    return router
