"""Who may do what on the bus: one NATS role per kind of process, declared here once.

`wgmfa up` renders its nats-server authorization from these roles (wgmfa.credentials),
and deploy/nats/*.conf is generated from them too (`python -m wgmfa.credentials deploy`),
so there is no second, hand-kept copy. Every role gets only the subjects of its job,
including the JetStream API calls for its own streams and consumers, and its own inbox
prefix (request replies, JetStream API answers and push deliveries land there), so no
role can read another's replies.

Rules the JetStream API subjects below rely on (checked against nats-server by
tests/test_bus_permissions.py):
- `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`: the server refuses a filter other
  than the one in the subject, so a permission with the filter in it pins what the
  consumer may read; with the name in it, which consumer it may create or change.
- `$JS.API.CONSUMER.CREATE.<stream>` (no name): ephemeral consumers only; the server
  refuses a durable name on it. Its filter is in the body, so only roles allowed to read
  the whole stream get it (operator, reaper).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from events import streams, subjects

CORE = "core"
PROXY = "proxy"
REAPER = "reaper"
ADMIN = "admin"
OPERATOR = "operator"
FIXED_ROLES = (CORE, PROXY, REAPER, ADMIN, OPERATOR)
GATEWAY_PREFIX = "gateway"

PEERS = streams.PEERS.name
STATS = streams.STATS.name
EVENTS = streams.EVENTS.name
DLQ = streams.DLQ.name


@dataclass(frozen=True)
class Role:
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    """May answer requests it received (on their reply subjects), and nothing more there."""
    description: str = field(default="", compare=False)
    consumers: tuple[tuple[str, str], ...] = ()
    """(stream, name) of the named consumers it owns; every other role is denied them."""

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.name)


def inbox_prefix(role_name: str) -> str:
    """The role's own inbox: `_INBOX_<role>`; a gateway's is `_INBOX_gateway.<location>.<gateway>`."""
    if role_name.startswith(GATEWAY_PREFIX + "-"):
        location, gateway_id = parse_gateway_role(role_name)
        return f"_INBOX_{GATEWAY_PREFIX}.{location}.{gateway_id}"
    return f"_INBOX_{role_name}"


def _durable(stream: str, name: str, filter_subject: str) -> list[str]:
    """Create (with this filter only), look up and acknowledge one named consumer, which
    pushes its messages to the role's inbox (events.bus.StreamRouter.consumer); delete it
    to replace the pull consumer of that name an earlier version made."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter_subject}",
        f"$JS.API.CONSUMER.INFO.{stream}.{name}",
        f"$JS.API.CONSUMER.DELETE.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


def _ephemeral_reader(stream: str) -> list[str]:
    """Ordered (ephemeral, push) consumers of the stream for oneself, created by name
    (events.nats_direct.ordered_subscribe), and their flow control. The names of every
    durable are denied (`authorization_block`), so this cannot change another's consumer;
    there is no delete."""
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.*.>", f"$JS.FC.{stream}.>"]


def core() -> Role:
    owned = [subjects.PEER_ALL, subjects.EVENTS_ALL, subjects.DLQ_ALL, f"{subjects.NOTIFY_LOGIN_PREFIX}.>"]
    # Its callers' inboxes, besides `allow_responses`: a configuration reload forgets which
    # replies are pending, and an answer in flight would be refused.
    owned += [f"{inbox_prefix(caller)}.>" for caller in (PROXY, ADMIN)]
    for stream in (PEERS, STATS, EVENTS, DLQ):
        owned += [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}", f"$JS.API.STREAM.INFO.{stream}"]
    owned += [f"$JS.API.STREAM.MSG.GET.{PEERS}"]  # the last state of a peer subject, for compare-and-set
    owned += _durable(PEERS, "core-peers", subjects.PEER_ALL)
    owned += _durable(STATS, "core-stats", subjects.STATS_ALL)
    return Role(
        CORE,
        publish=tuple(owned),
        subscribe=(subjects.RPC_ALL, f"{inbox_prefix(CORE)}.>"),
        allow_responses=True,
        consumers=((PEERS, "core-peers"), (STATS, "core-stats")),
        description="serves wgmfa.rpc.>; publishes peer state, events, DLQ copies and login notifications; "
        "owns the streams and its durables core-peers and core-stats",
    )


def proxy() -> Role:
    return Role(
        PROXY,
        publish=(
            subjects.RPC_CORE_HELLO,
            f"{subjects.RPC_MFA_PREFIX}.>",
            f"{subjects.RPC_ENROLL_PREFIX}.>",
            f"{subjects.RPC_OIDC_PREFIX}.>",
        ),
        subscribe=(f"{subjects.NOTIFY_LOGIN_PREFIX}.>", f"{inbox_prefix(PROXY)}.>"),
        description="requests the client-facing RPC (core.hello, mfa, enroll, oidc); reads login notifications",
    )


def admin() -> Role:
    return Role(
        ADMIN,
        publish=(subjects.RPC_CORE_HELLO, f"{subjects.RPC_ADMIN_PREFIX}.>"),
        subscribe=(f"{inbox_prefix(ADMIN)}.>",),
        description="requests wgmfa.rpc.admin.> (and core.hello, for the core's RPC key)",
    )


def reaper() -> Role:
    return Role(
        REAPER,
        publish=(
            subjects.PEER_ALL,  # revokes; gateways apply only authorizations the core signed
            f"{subjects.EVENTS_PREFIX}.reaper.>",
            subjects.dlq(subjects.PEER_ALL),
            subjects.dlq(subjects.STATS_ALL),
            *_ephemeral_reader(PEERS),
            *_ephemeral_reader(STATS),
            f"$JS.API.STREAM.MSG.GET.{EVENTS}",  # reads back its own start event for the server's clock
        ),
        subscribe=(f"{inbox_prefix(REAPER)}.>",),
        description="reads peer state and stats; publishes revokes on wgmfa.peer.> and its events",
    )


def operator() -> Role:
    readable = (EVENTS, DLQ, STATS)
    return Role(
        OPERATOR,
        publish=tuple(p for stream in readable for p in _ephemeral_reader(stream)) + ("$JS.API.STREAM.NAMES",),
        subscribe=(f"{inbox_prefix(OPERATOR)}.>",),
        description="reads events, DLQ and stats through ephemeral consumers of its own; nothing else",
    )


def gateway_role_name(location_id: int, gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}-{subjects.token(location_id)}-{subjects.token(gateway_id)}"


def parse_gateway_role(name: str) -> tuple[int, str]:
    prefix, _, rest = name.partition("-")
    location, _, gateway_id = rest.partition("-")
    if prefix != GATEWAY_PREFIX or not location.isdigit() or not gateway_id:
        raise ValueError(f"not a gateway role: {name!r}")
    return int(location), subjects.token(gateway_id)


def gateway_durable(location_id: int, gateway_id: str) -> str:
    """The gateway's own durable consumer on the peer stream."""
    return gateway_role_name(location_id, gateway_id)


def gateway_snapshot_consumer(location_id: int, gateway_id: str) -> str:
    """The short-lived consumer a gateway reads the last state of every peer with."""
    return f"{gateway_role_name(location_id, gateway_id)}-snapshot"


def gateway(location_id: int, gateway_id: str) -> Role:
    name = gateway_role_name(location_id, gateway_id)
    peers = subjects.peers_of_location(location_id)
    snapshot = gateway_snapshot_consumer(location_id, gateway_id)
    return Role(
        name,
        publish=(
            subjects.stats(location_id, gateway_id),
            f"{subjects.EVENTS_PREFIX}.gateway.>",
            subjects.dlq(f"{subjects.PEER_PREFIX}.{location_id}.>"),
            f"$JS.API.STREAM.INFO.{PEERS}",
            *_durable(PEERS, gateway_durable(location_id, gateway_id), peers),
            f"$JS.API.CONSUMER.CREATE.{PEERS}.{snapshot}.{peers}",
            f"$JS.API.CONSUMER.INFO.{PEERS}.{snapshot}",
            f"$JS.API.CONSUMER.MSG.NEXT.{PEERS}.{snapshot}",
            f"$JS.API.CONSUMER.DELETE.{PEERS}.{snapshot}",
        ),
        subscribe=(f"{inbox_prefix(name)}.>",),
        consumers=((PEERS, gateway_durable(location_id, gateway_id)), (PEERS, snapshot)),
        description=f"reads wgmfa.peer.{location_id}.> only; publishes its stats and gateway events",
    )


def role(name: str) -> Role:
    """A role by its name (`core`, …, `gateway-<location>-<gateway>`)."""
    fixed = {CORE: core, PROXY: proxy, ADMIN: admin, REAPER: reaper, OPERATOR: operator}
    if name in fixed:
        return fixed[name]()
    location_id, gateway_id = parse_gateway_role(name)
    return gateway(location_id, gateway_id)


# --- nats-server configuration ------------------------------------------------------------


def _quoted(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def user_entry(role: Role, nkey: str, deny: tuple[str, ...] = (), indent: str = "    ") -> str:
    """One `users` entry: `nkey` is a public NKey (U…) or a `$VARIABLE` the server reads
    from its environment; `deny` overrides what `publish` allows."""
    key = nkey if nkey.startswith("$") else f'"{nkey}"'
    lines = [
        f"{indent}# {role.name}: {role.description}" if role.description else f"{indent}# {role.name}",
        f"{indent}{{",
        f"{indent}  nkey: {key}",
        f"{indent}  permissions: {{",
        f"{indent}    publish: {{ allow: {_quoted(role.publish)}"
        + (f", deny: {_quoted(deny)} }}" if deny else " }"),
        f"{indent}    subscribe: {{ allow: {_quoted(role.subscribe)} }}",
    ]
    if role.allow_responses:
        lines.append(f"{indent}    allow_responses: true")
    lines += [f"{indent}  }}", f"{indent}}}"]
    return "\n".join(lines)


def authorization_block(users: list[tuple[Role, str]], extra_entries: list[str] | None = None) -> str:
    """`authorization { users = [...] }` for these (role, public NKey) pairs."""
    owned = [(r.name, stream, name) for r, _ in users for stream, name in r.consumers]
    for fixed in (core(),):  # the core's durables are protected even where no core is admitted
        owned += [(fixed.name, stream, name) for stream, name in fixed.consumers if (fixed.name, stream, name) not in owned]
    entries = []
    for r, key in users:
        # where a role may name its own ephemeral consumers, it may not name another's
        deny = tuple(
            f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>"
            for owner, stream, name in owned
            if owner != r.name and f"$JS.API.CONSUMER.CREATE.{stream}.*.>" in r.publish
        )
        entries.append(user_entry(r, key, deny))
    entries += list(extra_entries or [])
    return "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}\n"
