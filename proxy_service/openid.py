"""External MFA in the browser: the two pages the user sees and the two calls they make
(Defguard's `/openid/mfa`, `/openid/mfa/callback`, `auth_info` and `callback/mfa`).

The proxy keeps nothing: the core makes the authorization URL and an encrypted cookie
that binds the flow to this browser; the proxy sets the cookie and hands it back with the
provider's answer.
"""
from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from proxy_service.core_client import CoreClient
from proxy_service.openapi import errors
from proxy_service.settings import ProxySettings
from schemas.http import OpenIdAuthInfoRequest, OpenIdAuthInfoResponse, OpenIdCallbackRequest
from schemas.rpc import ClientInfo, RpcFailure

COOKIE = "wgmfa_oidc"
COOKIE_PATH = "/api/v1/openid/callback"
FLOW_MFA = "mfa"

_STYLE = """
body { font-family: system-ui, sans-serif; background: #f4f5f7; color: #1d2330; margin: 0; }
main { max-width: 28rem; margin: 12vh auto; background: #fff; padding: 2rem; border-radius: 8px;
       box-shadow: 0 1px 4px rgba(0,0,0,.12); }
h1 { font-size: 1.3rem; margin-top: 0; }
a.button { display: inline-block; background: #2255cc; color: #fff; padding: .7rem 1.2rem;
           border-radius: 6px; text-decoration: none; font-weight: 600; }
.failed h1 { color: #b42318; }
[hidden] { display: none !important; }
"""

_MFA_SCRIPT = """
(async () => {
  const title = document.getElementById('title');
  const status = document.getElementById('status');
  const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1);
  const token = new URLSearchParams(window.location.search).get('token');
  if (!token) {
    status.textContent = 'This link is incomplete: start the login again from the VPN app.';
    return;
  }
  try {
    const response = await fetch('/api/v1/openid/auth_info', {
      method: 'POST', credentials: 'same-origin',
      headers: {'content-type': 'application/json'},
      body: JSON.stringify({state: token, type: 'mfa'}),
    });
    const body = await response.json();
    if (!response.ok) {
      document.body.className = 'failed';
      title.textContent = 'The VPN login cannot go on';
      status.textContent = sentence(body.error) + '. Start the login again from the VPN app.';
      return;
    }
    const button = document.getElementById('authenticate');
    button.textContent = 'Authenticate with ' + (body.button_display_name || 'OpenID');
    button.href = body.url;
    button.hidden = false;
    status.textContent = 'Sign in with your company account to connect to the VPN.';
  } catch (error) {
    status.textContent = 'The VPN service cannot be reached: ' + error;
  }
})();
"""

_CALLBACK_SCRIPT = """
(async () => {
  const title = document.getElementById('title');
  const status = document.getElementById('status');
  const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1);
  const query = new URLSearchParams(window.location.search);
  // the code and state work once: keep them out of the history
  window.history.replaceState(null, '', window.location.pathname);
  const failed = (message) => {
    document.body.className = 'failed';
    title.textContent = 'VPN login failed';
    status.textContent = sentence(message) + ' Start the login again from the VPN app.';
  };
  if (!query.get('state')) {
    failed('This page was opened without the answer of the identity provider.');
    return;
  }
  try {
    const response = await fetch('/api/v1/openid/callback/mfa', {
      method: 'POST', credentials: 'same-origin',
      headers: {'content-type': 'application/json'},
      body: JSON.stringify({
        state: query.get('state'), code: query.get('code'), iss: query.get('iss'),
        error: query.get('error'), type: 'mfa',
      }),
    });
    const body = await response.json();
    if (!response.ok) {
      failed(body.error + '.');
      return;
    }
    title.textContent = 'VPN login succeeded';
    status.textContent = 'You can close this window and return to the VPN app.';
  } catch (error) {
    failed('The VPN service cannot be reached: ' + error + '.');
  }
})();
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _page(title: str, body: str, script: str) -> tuple[str, dict[str, str]]:
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_STYLE}</style></head>"
        f'<body><main><h1 id="title">{title}</h1>{body}</main><script>{script}</script></body></html>\n'
    )
    headers = {
        # only this page's own script and style; nothing may frame it or learn its URL
        "Content-Security-Policy": f"default-src 'none'; script-src {_hash(script)}; style-src {_hash(_STYLE)}; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
    return html, headers


MFA_PAGE = _page(
    "VPN login",
    '<p id="status">Preparing the login…</p><p><a id="authenticate" class="button" hidden></a></p>',
    _MFA_SCRIPT,
)
CALLBACK_PAGE = _page("VPN login", '<p id="status">Checking the answer of the identity provider…</p>', _CALLBACK_SCRIPT)


def add_openid_routes(
    app: FastAPI,
    core: CoreClient,
    settings: ProxySettings,
    client_info: Callable[[Request], ClientInfo],
    error_response: Callable[[Request, RpcFailure], Awaitable[JSONResponse]],
) -> None:
    secure_cookie = settings.public_url.startswith("https://")

    @app.get("/openid/mfa", include_in_schema=False)
    async def mfa_page() -> HTMLResponse:
        return HTMLResponse(MFA_PAGE[0], headers=MFA_PAGE[1])

    @app.get("/openid/mfa/callback", include_in_schema=False)
    async def callback_page() -> HTMLResponse:
        return HTMLResponse(CALLBACK_PAGE[0], headers=CALLBACK_PAGE[1])

    @app.post("/api/v1/openid/auth_info", response_model=OpenIdAuthInfoResponse, responses=errors(401))
    async def auth_info(body: OpenIdAuthInfoRequest, request: Request) -> JSONResponse:
        if body.type != FLOW_MFA:
            return JSONResponse({"error": "only the mfa flow is supported"}, status_code=400)
        url, name, cookie, max_age = await core.oidc_auth_url(body.state, client_info(request))
        response = JSONResponse(OpenIdAuthInfoResponse(url=url, button_display_name=name).model_dump())
        # Encrypted by the core, readable by no script, sent only back to the callback
        # call from this site: the browser that started the flow must finish it.
        response.set_cookie(COOKIE, cookie, max_age=max_age, path=COOKIE_PATH, secure=secure_cookie,
                            httponly=True, samesite="strict")
        return response

    @app.post("/api/v1/openid/callback/mfa", responses=errors(401))
    async def callback(body: OpenIdCallbackRequest, request: Request) -> JSONResponse:
        if body.type != FLOW_MFA:
            return JSONResponse({"error": "Invalid flow type for MFA callback"}, status_code=400)
        try:
            await core.oidc_callback(body.state, body.code, body.iss, body.error, request.cookies.get(COOKIE),
                                     client_info(request))
            response = JSONResponse({})
        except RpcFailure as exc:
            response = await error_response(request, exc)
        response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=secure_cookie, httponly=True, samesite="strict")
        return response
