"""The rules of external MFA that are plain functions: who may complete whose login, the
browser cookie's sealing, which provider URLs are accepted. (The flow itself runs against
real providers in test_oidc.py and test_oidc_tokens.py.)"""
from __future__ import annotations

import pytest

from core_service.keys import OIDC_COOKIE, Vault
from core_service.models import User
from core_service.oidc import Identity, check_provider_url, bind_or_match
from schemas.rpc import RpcFailure

ISSUER = "https://idp.example.com"


def user(email: str = "Alice@Example.com", issuer: str | None = None, subject: str | None = None) -> User:
    return User(username="alice", email=email, oidc_issuer=issuer, oidc_subject=subject)


def identity(subject: str = "s-1", email: str | None = "alice@example.com", verified: bool = True) -> Identity:
    return Identity(issuer=ISSUER, subject=subject, email=email, email_verified=verified)


def test_the_first_login_binds_by_verified_email_whatever_its_case() -> None:
    alice = user()
    assert bind_or_match(alice, identity(), bound_elsewhere=False) is None
    assert (alice.oidc_issuer, alice.oidc_subject) == (ISSUER, "s-1")


@pytest.mark.parametrize(("who", "reason"), [
    (identity(verified=False), "oidc_email_unverified"),
    (identity(email=None), "oidc_email_unverified"),
    (identity(email="mallory@example.com"), "oidc_identity_mismatch"),
])
def test_the_first_login_binds_nothing_else(who: Identity, reason: str) -> None:
    alice = user()
    assert bind_or_match(alice, who, bound_elsewhere=False) == reason
    assert alice.oidc_subject is None


def test_an_identity_bound_to_another_user_does_not_bind_again() -> None:
    alice = user()
    assert bind_or_match(alice, identity(), bound_elsewhere=True) == "oidc_identity_mismatch"
    assert alice.oidc_subject is None


def test_a_bound_user_takes_only_its_identity_not_its_email() -> None:
    alice = user(issuer=ISSUER, subject="s-1")
    assert bind_or_match(alice, identity(), bound_elsewhere=False) is None
    assert bind_or_match(alice, identity(subject="s-2"), bound_elsewhere=False) == "oidc_identity_mismatch"
    other_issuer = Identity(issuer="https://other.example.com", subject="s-1", email="alice@example.com", email_verified=True)
    assert bind_or_match(alice, other_issuer, bound_elsewhere=False) == "oidc_identity_mismatch"
    assert (alice.oidc_issuer, alice.oidc_subject) == (ISSUER, "s-1")


def test_the_browser_cookie_opens_only_with_the_deployments_key() -> None:
    vault, other = Vault(b"k" * 32), Vault(b"o" * 32)
    cookie = vault.seal_cookie(OIDC_COOKIE, '{"login": "x"}')
    assert "login" not in cookie and set(cookie) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert Vault(b"k" * 32).open_cookie(OIDC_COOKIE, cookie) == '{"login": "x"}'  # any core of the deployment
    assert other.open_cookie(OIDC_COOKIE, cookie) is None
    tampered = cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1]
    assert vault.open_cookie(OIDC_COOKIE, tampered) is None
    assert vault.open_cookie(OIDC_COOKIE, "not base64 at all!") is None
    # a cookie is not an at-rest secret: the two keys differ
    assert vault.open_cookie(OIDC_COOKIE, vault.encrypt("secret").removeprefix("v1:")) is None


@pytest.mark.parametrize("url", ["https://idp.example.com", "http://127.0.0.1:8080", "http://localhost/x", "http://[::1]:9"])
def test_provider_urls_are_https_or_loopback(url: str) -> None:
    check_provider_url(url, "the issuer")


@pytest.mark.parametrize("url", ["http://idp.example.com", "http://10.0.0.1", "ftp://idp.example.com", "idp.example.com", ""])
def test_other_provider_urls_are_refused(url: str) -> None:
    with pytest.raises(RpcFailure, match="must be an https URL"):
        check_provider_url(url, "the issuer")
