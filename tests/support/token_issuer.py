"""A small OpenID provider that misbehaves on purpose: it sends the ID tokens a real
provider never would (another audience, another issuer, expired, `alg: none`, an unknown
key, HS256), minted with joserfc, so that the core's validation is tested through its real
path. It answers the authorization request at once (no login page) and checks PKCE."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlencode

import uvicorn
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

from tests.support.oidc import CLIENT_ID, CLIENT_SECRET
from tests.support.stack import free_port


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


class TokenIssuer:
    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.published = [self.key]
        self.mode = "good"
        self.subject = "someone"
        self.email = "someone@example.com"
        self.offers_s256 = True
        self.algorithms = ["RS256"]
        self.token_delay_s = 0.0
        self.jwks_fetches = 0
        self._codes: dict[str, dict[str, str]] = {}
        app = Starlette(routes=[
            Route("/.well-known/openid-configuration", self._discovery),
            Route("/jwks", self._jwks),
            Route("/authorize", self._authorize),
            Route("/token", self._token, methods=["POST"]),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> "TokenIssuer":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test issuer did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _discovery(self, _request: Request) -> JSONResponse:
        return JSONResponse({
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"] if self.offers_s256 else ["plain"],
            "id_token_signing_alg_values_supported": self.algorithms,
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        })

    async def _jwks(self, _request: Request) -> JSONResponse:
        self.jwks_fetches += 1
        return JSONResponse(KeySet(self.published).as_dict(private=False))

    async def _authorize(self, request: Request) -> RedirectResponse:
        params = request.query_params
        code = secrets.token_urlsafe(24)
        self._codes[code] = {"nonce": params.get("nonce", ""), "challenge": params.get("code_challenge", ""),
                             "client_id": params.get("client_id", "")}
        query = urlencode({"code": code, "state": params.get("state", ""), "iss": self.issuer})
        return RedirectResponse(f"{params['redirect_uri']}?{query}", status_code=302)

    async def _token(self, request: Request) -> JSONResponse:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        grant = self._codes.pop(str(form.get("code")), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if grant is None or grant["challenge"] != challenge:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        if self.mode == "outage":
            return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=502)
        return JSONResponse({"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "expires_in": 300,
                             "id_token": self.id_token(grant["nonce"])})

    def id_token(self, nonce: str) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": self.subject, "aud": CLIENT_ID, "iat": now,
                                  "exp": now + 300, "nonce": nonce, "email": self.email, "email_verified": True}
        header: dict[str, Any] = {"alg": "RS256", "kid": self.key.kid}
        key: Any = self.key
        if self.mode == "other_audience":
            claims.update(aud=["another-client"], azp=CLIENT_ID)
        elif self.mode == "wrong_issuer":
            claims["iss"] = "https://idp.attacker.example"
        elif self.mode == "expired":
            claims.update(iat=now - 900, exp=now - 300)
        elif self.mode == "issued_in_future":
            claims.update(iat=now + 900, exp=now + 1200)
        elif self.mode == "no_nonce":
            del claims["nonce"]
        elif self.mode == "alg_none":
            return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
        elif self.mode == "unknown_key":
            key = RSAKey.generate_key(2048, parameters={"kid": "k-unknown"})
            header["kid"] = "k-unknown"
        elif self.mode == "rotated_key":
            # the provider rotated: a new key, published from now on, signs the token
            key = RSAKey.generate_key(2048, parameters={"kid": "k2"})
            self.published = [key]
            header["kid"] = "k2"
        elif self.mode == "hs256":
            key = OctKey.import_key(CLIENT_SECRET.encode())
            header = {"alg": "HS256"}
        return jwt.encode(header, claims, key, algorithms=[header["alg"]])
