"""Every subject wgmfa uses. Handlers build subjects only through this module."""
from __future__ import annotations

import functools
import re
from typing import Final

ROOT: Final = "wgmfa"

# request/reply, queue group `core`
CORE_QUEUE: Final = "core"
RPC_CORE_HELLO: Final = "wgmfa.rpc.core.hello"
RPC_MFA_START: Final = "wgmfa.rpc.mfa.start"
RPC_MFA_FINISH: Final = "wgmfa.rpc.mfa.finish"
RPC_MFA_FINISH_REMOTE: Final = "wgmfa.rpc.mfa.finish_remote"
RPC_MFA_TOKEN_STATUS: Final = "wgmfa.rpc.mfa.token_status"
RPC_OIDC_AUTH_URL: Final = "wgmfa.rpc.oidc.auth_url"
RPC_OIDC_CALLBACK: Final = "wgmfa.rpc.oidc.callback"
RPC_ENROLL_MOBILE: Final = "wgmfa.rpc.enroll.mobile"
RPC_ENROLL_START: Final = "wgmfa.rpc.enroll.start"
RPC_ENROLL_FACTOR_START: Final = "wgmfa.rpc.enroll.factor_start"
RPC_ENROLL_FACTOR_FINISH: Final = "wgmfa.rpc.enroll.factor_finish"
RPC_ENROLL_ACTIVATE: Final = "wgmfa.rpc.enroll.activate"
RPC_ENROLL_CREATE_DEVICE: Final = "wgmfa.rpc.enroll.create_device"
RPC_ENROLL_NETWORK_INFO: Final = "wgmfa.rpc.enroll.network_info"
RPC_ENROLL_POLL: Final = "wgmfa.rpc.enroll.poll"
RPC_ADMIN_PREFIX: Final = "wgmfa.rpc.admin"
# prefixes the bus permissions are written by: any new call under one fits its role
RPC_MFA_PREFIX: Final = "wgmfa.rpc.mfa"
RPC_ENROLL_PREFIX: Final = "wgmfa.rpc.enroll"
RPC_OIDC_PREFIX: Final = "wgmfa.rpc.oidc"
RPC_ALL: Final = "wgmfa.rpc.>"

# streams
PEER_PREFIX: Final = "wgmfa.peer"
PEER_ALL: Final = "wgmfa.peer.>"
STATS_PREFIX: Final = "wgmfa.stats"
STATS_ALL: Final = "wgmfa.stats.>"
EVENTS_PREFIX: Final = "wgmfa.events"
EVENTS_ALL: Final = "wgmfa.events.>"
DLQ_PREFIX: Final = "wgmfa.dlq"
DLQ_ALL: Final = "wgmfa.dlq.>"

# core NATS, no stream
NOTIFY_LOGIN_PREFIX: Final = "wgmfa.notify.login"
NOTIFY_LOGIN_ALL: Final = "wgmfa.notify.login.*"

# the subjects with variable parts, as the AsyncAPI document names them
PEER_TEMPLATE: Final = "wgmfa.peer.{location_id}.{device_id}"
PEERS_OF_LOCATION_TEMPLATE: Final = "wgmfa.peer.{location_id}.*"
STATS_TEMPLATE: Final = "wgmfa.stats.{location_id}.{gateway_id}"
DLQ_TEMPLATE: Final = "wgmfa.dlq.{original_subject}"
NOTIFY_LOGIN_TEMPLATE: Final = "wgmfa.notify.login.{login_id}"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def token(value: object) -> str:
    """One subject token; refuses wildcards, dots and whitespace."""
    text = str(value)
    if not _TOKEN.match(text):
        raise ValueError(f"not a valid subject token: {text!r}")
    return text


def admin_rpc(command: str) -> str:
    return f"{RPC_ADMIN_PREFIX}.{token(command)}"


def peer(location_id: int, device_id: int) -> str:
    return f"{PEER_PREFIX}.{token(location_id)}.{token(device_id)}"


def peers_of_location(location_id: int) -> str:
    return f"{PEER_PREFIX}.{token(location_id)}.*"


def stats(location_id: int, gateway_id: str) -> str:
    return f"{STATS_PREFIX}.{token(location_id)}.{token(gateway_id)}"


def stats_of_location(location_id: int) -> str:
    return f"{STATS_PREFIX}.{token(location_id)}.*"


@functools.lru_cache(maxsize=256)  # event types are a fixed set; every published event asks
def event(event_type: str) -> str:
    """wgmfa.events.<area>.<what> for an event type `area.what`."""
    return f"{EVENTS_PREFIX}.{'.'.join(token(part) for part in event_type.split('.'))}"


def events_filter(pattern: str | None) -> str:
    """A filter for `events tail`: `mfa.*` → wgmfa.events.mfa.*; a full subject passes as is."""
    if not pattern:
        return EVENTS_ALL
    if pattern.startswith(f"{ROOT}."):
        return pattern
    return f"{EVENTS_PREFIX}.{pattern}"


def dlq(original_subject: str) -> str:
    return f"{DLQ_PREFIX}.{original_subject}"


def notify_login(login_id: object) -> str:
    return f"{NOTIFY_LOGIN_PREFIX}.{token(login_id)}"


_TEMPLATE_OF_PREFIX: Final = {
    PEER_PREFIX: PEER_TEMPLATE,
    STATS_PREFIX: STATS_TEMPLATE,
    DLQ_PREFIX: DLQ_TEMPLATE,
    NOTIFY_LOGIN_PREFIX: NOTIFY_LOGIN_TEMPLATE,
}
_FIXED_PREFIXES: Final = (f"{ROOT}.rpc.", f"{EVENTS_PREFIX}.")


def template_of(subject: str) -> str:
    """The subject as the AsyncAPI document names it: a subject with a device, gateway or
    login in it becomes its template, a fixed one (RPC, audit event) stays itself, a reply
    inbox becomes its role's prefix and `>`, and any other its first two tokens and `>`.
    Metrics label by this, so that a label has a bounded number of values however many
    devices, logins and connections there are."""
    if subject.startswith(_FIXED_PREFIXES):
        return subject
    for prefix, template in _TEMPLATE_OF_PREFIX.items():
        if subject.startswith(f"{prefix}."):
            return template
    tokens = subject.split(".")
    return ".".join([*tokens[: 1 if tokens[0].startswith("_INBOX") else 2], ">"])


def parse_peer(subject: str) -> tuple[int, int]:
    """(location_id, device_id) of a wgmfa.peer.<location>.<device> subject."""
    parts = subject.split(".")
    if len(parts) != 4 or f"{parts[0]}.{parts[1]}" != PEER_PREFIX:
        raise ValueError(f"not a peer subject: {subject!r}")
    return int(parts[2]), int(parts[3])
