"""Who may do what on the bus, against a real nats-server with wgmfa's generated
configuration: `wgmfa up`'s (embedded) and deploy/'s (a three-node cluster with TLS and
mutually authenticated routes). For every role what it does succeeds, and a
representative set of what it must not do is refused by the server."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from nats.js.api import DeliverPolicy

from events import nats_direct
from events.peer_log import PeerLog
from events import permissions, streams, subjects
from events.bus import Bus, BusUnavailable
from runtime.testing import FakeClock
from schemas.sealing import generate_keypair, generate_psk, seal
from wgmfa.nats_server import NatsServer
from schemas.signing import PeerSigner
from gateway_worker.app import Gateway
from wireguard.port import PeerConfig
from wireguard.testing import FakeBackend
from gateway_worker.settings import GatewaySettings
from reaper_worker.app import Reaper, ReaperSettings
from schemas import rpc
from schemas.common import RevokeReason, utcnow, uuid7
from schemas.events import PeerAuthorized, PeerRevoked, StatsSample, UserCreated
from tests.support.deploy import Bed, start_deploy_cluster
from tests.support.stack import REPO, eventually, secured_nats_server, serve_endpoints
from wgmfa import credentials as creds
from wgmfa.credentials import BusCredentials

LOCATION = 1
GATEWAY = "office-a"  # deploy/nats/gateways admits it
OTHER_LOCATION = 2


async def refused_publish(nc: nats.NATS, errors: list[str], subject: str, payload: bytes = b"{}") -> None:
    await nc.publish(subject, payload)
    await nc.flush()
    await eventually(lambda: any("permissions violation for publish" in e and f'"{subject.lower()}"' in e for e in errors),
                     timeout=5, what=f"the server to refuse publishing on {subject}")


async def refused_subscribe(nc: nats.NATS, errors: list[str], subject: str) -> None:
    await nc.subscribe(subject)
    await nc.flush()
    await eventually(lambda: any("permissions violation for subscription" in e and f'"{subject.lower()}"' in e for e in errors),
                     timeout=5, what=f"the server to refuse subscribing to {subject}")


async def call_when_served(bus: Bus, subject: str) -> None:
    """A call that succeeds once the responder's interest has reached the caller's node
    (across the cluster's routes that takes a moment)."""

    async def answered() -> bool:
        try:
            await bus.call(subject, rpc.CoreHello(), rpc.Empty, timeout=2)
            return True
        except BusUnavailable:
            return False

    await eventually(answered, timeout=15, interval=0.1, what=f"an answer on {subject}")


def create_request(stream: str, name: str, filter_subject: str, *, durable: bool = False) -> tuple[str, bytes]:
    """The JetStream API request nats-py sends to create (or change) a named consumer."""
    config: dict = {"name": name, "filter_subject": filter_subject, "ack_policy": "explicit", "deliver_policy": "all"}
    if durable:
        config["durable_name"] = name
    body = json.dumps({"stream_name": stream, "config": config}).encode()
    return f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter_subject}", body


async def refused_create(nc: nats.NATS, errors: list[str], stream: str, name: str, filter_subject: str) -> None:
    subject, body = create_request(stream, name, filter_subject, durable=True)
    await refused_publish(nc, errors, subject, body)
    # and by the nameless form, where the body names the consumer
    await refused_publish(nc, errors, f"$JS.API.CONSUMER.CREATE.{stream}", body)


# --- the two configurations --------------------------------------------------------------


@pytest.fixture
def embedded() -> Iterator[Bed]:
    with secured_nats_server() as server:
        roles = server.credentials
        roles.add_gateway(LOCATION, GATEWAY)
        roles.add_gateway(OTHER_LOCATION, "branch")
        server.server.reload(server.authorization())
        seeds = {role: roles.seed(role) for role in roles.roles()}
        yield Bed("embedded", server.plain_url, seeds)


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Bed]:
    bed = start_deploy_cluster(tmp_path)
    try:
        yield bed
    finally:
        bed.stop()


async def ignore_peer_state(state: PeerAuthorized | PeerRevoked) -> None:
    pass


async def ignore_sample(sample: StatsSample) -> None:
    pass


@pytest_asyncio.fixture(params=["embedded", "deploy"])
async def bed(request: pytest.FixtureRequest) -> AsyncIterator[Bed]:
    bed: Bed = request.getfixturevalue(request.param)
    for attempt in range(3):
        core = await bed.connect(permissions.CORE)
        try:
            # three TLS nodes elect their JetStream leader at their own pace on a loaded machine
            await core.ensure_streams(3 if bed.kind == "deploy" else 1, wait_s=180)
            # the core's durables exist, as in a running system
            durables = core.stream_router()
            durables.consumer(ignore_peer_state, stream=streams.PEERS.name, durable="core-peers", filter_subject=subjects.PEER_ALL)
            durables.consumer(ignore_sample, stream=streams.STATS.name, durable="core-stats", filter_subject=subjects.STATS_ALL)
            await core.serve(durables)
            break
        except BusUnavailable as error:
            raise BusUnavailable(f"{error}\n{bed.log_tails()}") from error
        except nats.errors.ConnectionClosedError:
            # the embedded server's configuration reload (the gateways just admitted) may
            # reset a connection made while it runs: connect again
            if attempt == 2:
                raise
        finally:
            await core.close()
    yield bed


# --- tests ---------------------------------------------------------------------------------


def test_the_checked_in_deploy_configuration_is_the_generated_one() -> None:
    for name, text in creds.deploy_files().items():
        assert (REPO / "deploy" / "nats" / name).read_text() == text, f"deploy/nats/{name} is stale: run python -m wgmfa.credentials deploy"


async def test_no_credentials_or_unknown_keys_are_refused(bed: Bed) -> None:
    errors: list[str] = []
    with pytest.raises(Exception) as no_credentials:
        await bed.raw(None, errors)
    assert "authorization" in str(no_credentials.value).lower() or any("authorization" in e for e in errors)
    errors.clear()
    with pytest.raises(Exception):
        await bed.raw(None, errors, seed=creds.new_seed())  # a well-formed key the server does not know
    with pytest.raises(BusUnavailable):
        await Bus.connect(bed.url, "nobody", wait_s=1, ca_file=bed.ca_file)


async def test_core_serves_rpc_owns_streams_and_publishes_peer_state(bed: Bed) -> None:
    core = await bed.connect(permissions.CORE)
    admin = await bed.connect(permissions.ADMIN)
    errors: list[str] = []
    raw = await bed.raw(permissions.CORE, errors)
    try:
        async def hello(request: rpc.CoreHello) -> rpc.Empty:
            return rpc.Empty()

        await serve_endpoints(core, {subjects.RPC_CORE_HELLO: hello})
        await call_when_served(admin, subjects.RPC_CORE_HELLO)
        signer = PeerSigner(b"k" * 32)
        state = signer.sign(authorization(1))
        assert await PeerLog(core).publish_peer_state(state)
        assert (await PeerLog(core).last_peer_state(LOCATION, 1)).state == state  # type: ignore[union-attr]
        await core.publish_event(UserCreated(user_id=1, username="alice"))
        # it does not call admin RPC, read others' inboxes, or delete another's consumer or a stream
        await refused_publish(raw, errors, subjects.admin_rpc("user_add"))
        await refused_subscribe(raw, errors, "_INBOX_proxy.>")
        await refused_publish(raw, errors, f"$JS.API.CONSUMER.DELETE.{streams.PEERS.name}.{permissions.gateway_durable(LOCATION, GATEWAY)}")
        await refused_publish(raw, errors, f"$JS.API.STREAM.DELETE.{streams.EVENTS.name}")
    finally:
        await raw.close()
        await asyncio.gather(core.close(), admin.close())


async def test_proxy_requests_client_rpc_only(bed: Bed) -> None:
    proxy = await bed.connect(permissions.PROXY)
    core = await bed.connect(permissions.CORE)
    errors: list[str] = []
    raw = await bed.raw(permissions.PROXY, errors)
    try:
        async def hello(request: rpc.CoreHello) -> rpc.Empty:
            return rpc.Empty()

        client_subjects = (subjects.RPC_MFA_START, f"{subjects.RPC_ENROLL_PREFIX}.device",
                           f"{subjects.RPC_OIDC_PREFIX}.callback")
        await serve_endpoints(core, {subject: hello for subject in client_subjects})
        for subject in client_subjects:
            await call_when_served(proxy, subject)
        notified = await nats_direct.client(proxy.broker).subscribe(subjects.notify_login("x1"))
        await nats_direct.client(proxy.broker).flush()

        async def heard() -> bool:
            await nats_direct.client(core.broker).publish(subjects.notify_login("x1"), b"{}")
            try:
                return (await notified.next_msg(timeout=0.5)).data == b"{}"
            except nats.errors.TimeoutError:
                return False

        await eventually(heard, timeout=15, what="the login notification")
        # never admin, never answering in the core's place, never the peer stream
        await refused_publish(raw, errors, subjects.admin_rpc("gateway_credentials"))
        await refused_subscribe(raw, errors, subjects.RPC_ALL)
        await refused_publish(raw, errors, subjects.peer(LOCATION, 1))
        await refused_subscribe(raw, errors, "_INBOX_admin.>")
    finally:
        await raw.close()
        await asyncio.gather(proxy.close(), core.close())


async def test_admin_requests_admin_rpc_only(bed: Bed) -> None:
    admin = await bed.connect(permissions.ADMIN)
    core = await bed.connect(permissions.CORE)
    errors: list[str] = []
    raw = await bed.raw(permissions.ADMIN, errors)
    try:
        async def answer(request: rpc.CoreHello) -> rpc.Empty:
            return rpc.Empty()

        await serve_endpoints(core, {subjects.admin_rpc("gateway_credentials"): answer})
        await call_when_served(admin, subjects.admin_rpc("gateway_credentials"))
        await refused_publish(raw, errors, subjects.peer(LOCATION, 1))
        await refused_publish(raw, errors, subjects.RPC_MFA_FINISH)
        await refused_subscribe(raw, errors, subjects.RPC_ALL)
        await refused_subscribe(raw, errors, subjects.EVENTS_ALL)
    finally:
        await raw.close()
        await asyncio.gather(admin.close(), core.close())


async def test_only_the_admin_role_reaches_gateway_credentials(bed: Bed) -> None:
    core = await bed.connect(permissions.CORE)
    answered: list[str] = []

    async def answer(request: rpc.CoreHello) -> rpc.Empty:
        answered.append("yes")
        return rpc.Empty()

    await serve_endpoints(core, {subjects.admin_rpc("gateway_credentials"): answer})
    admin = await bed.connect(permissions.ADMIN)
    try:
        await call_when_served(admin, subjects.admin_rpc("gateway_credentials"))  # the admin is answered
        answered.clear()
        for role in (permissions.PROXY, permissions.REAPER, permissions.OPERATOR,
                     permissions.gateway_role_name(LOCATION, GATEWAY)):
            bus = await bed.connect(role)
            try:
                with pytest.raises(BusUnavailable):
                    await bus.request(subjects.admin_rpc("gateway_credentials"), rpc.CoreHello(), timeout=1)
            finally:
                await bus.close()
        assert answered == []
    finally:
        await asyncio.gather(admin.close(), core.close())


def authorization(device: int, *, generation: int = 1, location: int = LOCATION) -> PeerAuthorized:
    return PeerAuthorized(location_id=location, device_id=device, generation=generation, session_id=device,
                          pubkey=generate_keypair()[1], allowed_ips=[f"10.{location}.0.{device + 1}/32"], keepalive_s=25,
                          psk_sealed=seal(generate_keypair()[1], generate_psk()), authorized_at=utcnow(), threshold_s=300)


async def test_reaper_reads_peers_and_stats_and_publishes_revokes(bed: Bed) -> None:
    core = await bed.connect(permissions.CORE)
    state = PeerSigner(b"k" * 32).sign(authorization(1))
    await PeerLog(core).publish_peer_state(state)
    settings = ReaperSettings(nats_url=bed.url, nats_nkey_seed=bed.seeds[permissions.REAPER], nats_ca_file=bed.ca_file,
                              sweep_interval_s=3600)
    reaper = Reaper(settings, clock=FakeClock())
    errors: list[str] = []
    raw = await bed.raw(permissions.REAPER, errors)
    try:
        await reaper.start()  # replays both streams and announces itself
        assert (LOCATION, 1) in reaper.liveness.authorizations
        revoke = PeerRevoked(location_id=LOCATION, device_id=1, generation=1, session_id=1, pubkey=state.pubkey,
                             reason=RevokeReason.IDLE)
        assert reaper.bus is not None
        await reaper.bus.publish(subjects.peer(LOCATION, 1), revoke)
        assert isinstance((await PeerLog(core).last_peer_state(LOCATION, 1)).state, PeerRevoked)  # type: ignore[union-attr]
        # no RPC, no answering the core's calls, no touching the core's consumers
        await refused_publish(raw, errors, subjects.admin_rpc("revoke"))
        await refused_subscribe(raw, errors, subjects.RPC_ALL)
        await refused_publish(raw, errors, f"$JS.API.CONSUMER.DELETE.{streams.PEERS.name}.core-peers")
        await refused_create(raw, errors, streams.PEERS.name, "core-peers", subjects.peers_of_location(9))
        await refused_create(raw, errors, streams.PEERS.name, permissions.gateway_durable(LOCATION, GATEWAY),
                             subjects.peers_of_location(9))
        info = await nats_direct.jetstream(core.broker, 5).consumer_info(streams.PEERS.name, "core-peers")
        assert info.config.filter_subject == subjects.PEER_ALL
    finally:
        await raw.close()
        await reaper.stop()
        await core.close()


async def test_operator_tails_events_but_changes_nothing(bed: Bed) -> None:
    core = await bed.connect(permissions.CORE)
    await core.publish_event(UserCreated(user_id=1, username="alice"))
    await PeerLog(core).publish_peer_state(PeerSigner(b"k" * 32).sign(authorization(1)))
    operator = await bed.connect(permissions.OPERATOR)
    errors: list[str] = []
    raw = await bed.raw(permissions.OPERATOR, errors)
    try:
        for filter_subject, stream in ((subjects.EVENTS_ALL, streams.EVENTS.name), (subjects.STATS_ALL, streams.STATS.name),
                                       (subjects.DLQ_ALL, streams.DLQ.name)):
            sub = await nats_direct.ordered_subscribe(operator.broker, filter_subject, stream, DeliverPolicy.ALL)
            if stream == streams.EVENTS.name:
                assert json.loads((await sub.next_msg(timeout=5)).data)["username"] == "alice"
            await sub.unsubscribe()
        # peers, RPC, durables and streams are out of reach
        await refused_create(raw, errors, streams.PEERS.name, "mine", subjects.PEER_ALL)
        await refused_publish(raw, errors, subjects.RPC_CORE_HELLO)
        await refused_publish(raw, errors, subjects.peer(LOCATION, 1))
        await refused_subscribe(raw, errors, subjects.EVENTS_ALL)  # only through its own consumers
        await refused_publish(raw, errors, f"$JS.API.CONSUMER.DELETE.{streams.STATS.name}.core-stats")
        await refused_create(raw, errors, streams.STATS.name, "core-stats", "wgmfa.stats.9.x")
        await refused_publish(raw, errors, f"$JS.API.STREAM.DELETE.{streams.EVENTS.name}")
        await refused_publish(raw, errors, f"$JS.API.STREAM.PURGE.{streams.DLQ.name}")
        info = await nats_direct.jetstream(core.broker, 5).consumer_info(streams.STATS.name, "core-stats")
        assert info.config.filter_subject == subjects.STATS_ALL
    finally:
        await raw.close()
        await asyncio.gather(operator.close(), core.close())


async def test_a_gateway_reads_its_location_and_cannot_issue_or_revoke_peers(bed: Bed) -> None:
    """A stolen gateway credential: it reads its own location, and that is all."""
    core = await bed.connect(permissions.CORE)
    signer = PeerSigner(b"k" * 32)
    sealing_private, sealing_public = generate_keypair()
    psk = generate_psk()
    mine = signer.sign(authorization(1).model_copy(update={"psk_sealed": seal(sealing_public, psk)}))
    theirs = signer.sign(authorization(1, location=OTHER_LOCATION))
    await PeerLog(core).publish_peer_state(mine)
    await PeerLog(core).publish_peer_state(theirs)
    credentials = rpc.GatewayCredentials(location_id=LOCATION, location_name="office", private_key=generate_keypair()[0],
                                         sealing_private_key=sealing_private, listen_port=51820, address="10.1.0.1/24",
                                         network="10.1.0.0/24", mfa_required=True, core_signing_key=signer.public_key)
    role = permissions.gateway_role_name(LOCATION, GATEWAY)
    settings = GatewaySettings(nats_url=bed.url, nats_nkey_seed=bed.seeds[role], nats_ca_file=bed.ca_file,
                               gateway_id=GATEWAY, stats_interval=3600)
    backend = FakeBackend()
    gateway = Gateway(settings, credentials, backend)
    errors: list[str] = []
    raw = await bed.raw(role, errors)
    try:
        await gateway.start()  # resync from its snapshot, then its durable
        assert backend.peers[mine.pubkey].config() == PeerConfig(mine.pubkey, psk, tuple(mine.allowed_ips))
        await gateway.publish_stats()
        newer = signer.sign(authorization(2).model_copy(update={"psk_sealed": seal(sealing_public, psk)}))
        await PeerLog(core).publish_peer_state(newer)
        await eventually(lambda: newer.pubkey in backend.peers, timeout=10, what="the gateway to follow its stream")
        assert gateway.bus is not None
        # it cannot issue or revoke peers, here or elsewhere
        forged = authorization(3)
        await refused_publish(raw, errors, subjects.peer(LOCATION, 3), forged.model_dump_json().encode())
        revoke = PeerRevoked(location_id=LOCATION, device_id=1, generation=1, pubkey=mine.pubkey, reason=RevokeReason.ADMIN)
        await refused_publish(raw, errors, subjects.peer(LOCATION, 1), revoke.model_dump_json().encode())
        assert (await PeerLog(core).last_peer_state(LOCATION, 1)).state == mine  # type: ignore[union-attr]
        # nor read another location's peers, by subscription or by consumer
        await refused_subscribe(raw, errors, subjects.peers_of_location(OTHER_LOCATION))
        await refused_create(raw, errors, streams.PEERS.name, permissions.gateway_snapshot_consumer(LOCATION, GATEWAY),
                             subjects.peers_of_location(OTHER_LOCATION))
        await refused_create(raw, errors, streams.PEERS.name, "core-peers", subjects.peers_of_location(LOCATION))
        await refused_publish(raw, errors, f"$JS.API.STREAM.MSG.GET.{streams.PEERS.name}",
                              json.dumps({"last_by_subj": subjects.peer(OTHER_LOCATION, 1)}).encode())
        # nor speak for another gateway, call admin RPC, or touch another's consumer
        sample = StatsSample(location_id=OTHER_LOCATION, gateway_id="branch", sample_id=uuid7(), sampled_at=utcnow(), peers=[])
        await refused_publish(raw, errors, subjects.stats(OTHER_LOCATION, "branch"), sample.model_dump_json().encode())
        await refused_publish(raw, errors, subjects.admin_rpc("gateway_credentials"))
        await refused_subscribe(raw, errors, subjects.RPC_ALL)
        await refused_publish(raw, errors, f"$JS.API.CONSUMER.DELETE.{streams.PEERS.name}.core-peers")
    finally:
        await raw.close()
        await gateway.stop()
        await core.close()


async def test_a_gateway_added_later_is_admitted_by_a_reload(tmp_path: Path) -> None:
    """`wgmfa up` admits the gateway of a location created while it runs by regenerating
    the server's authorization and reloading it; the server never restarts."""
    with secured_nats_server() as server:
        role = permissions.gateway_role_name(5, "late")
        pid = server.server.process.pid  # type: ignore[union-attr]
        server.allow_gateway(5, "late")

        async def admitted() -> bool:
            try:
                bus = await Bus.connect(server.plain_url, "late", wait_s=0.5, nkey_seed=server.seed(role))
            except BusUnavailable:
                return False
            await bus.close()
            return True

        await eventually(admitted, timeout=10, what="the reloaded server to admit the new gateway")
        assert server.server.process.pid == pid  # type: ignore[union-attr]


async def test_a_gateway_outside_up_gets_its_credential_from_the_state_directory(tmp_path: Path) -> None:
    """`python -m wgmfa.credentials gateway L G`, run by the owner of `wgmfa up`'s state
    directory, admits one more gateway on the running server and says where its seed is."""
    state = tmp_path / "state"
    roles = BusCredentials(state / "nats-credentials").ensure()
    server = NatsServer(state / "nats", authorization=roles.authorization())  # as `wgmfa up` runs it
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WGMFA_")} | {"WGMFA_STATE_DIR": str(state)}
        done = subprocess.run([sys.executable, "-m", "wgmfa.credentials", "gateway", "3", "remote"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        seed_file = state / "nats-credentials" / "gateway-3-remote.nk"
        assert str(seed_file) in done.stdout and "reloaded" in done.stdout
        assert seed_file.stat().st_mode & 0o777 == 0o600

        async def admitted() -> bool:
            try:
                bus = await Bus.connect(server.url, "remote", wait_s=0.5, nkey_seed=seed_file.read_text().strip())
            except BusUnavailable:
                return False
            await bus.close()
            return True

        await eventually(admitted, timeout=10, what="the server to admit the new gateway")
    finally:
        server.stop()


async def test_an_answer_in_flight_during_a_reload_still_arrives() -> None:
    """Admitting a gateway reloads the server, which forgets which replies are pending:
    the core's answer to a request it got before the reload must still get through."""
    with secured_nats_server() as server:
        core = await server.connect(permissions.CORE)
        admin = await server.connect(permissions.ADMIN)
        received, release = asyncio.Event(), asyncio.Event()

        async def slow(request: rpc.CoreHello) -> rpc.Empty:
            received.set()
            await release.wait()
            return rpc.Empty()

        try:
            await serve_endpoints(core, {subjects.RPC_CORE_HELLO: slow})
            call = asyncio.create_task(admin.call(subjects.RPC_CORE_HELLO, rpc.CoreHello(), rpc.Empty, timeout=10))
            await asyncio.wait_for(received.wait(), 10)
            log_before = server.log_file.read_text().count("Reloaded server configuration")
            server.allow_gateway(9, "new")
            await eventually(lambda: server.log_file.read_text().count("Reloaded server configuration") > log_before,
                             timeout=10, what="the reload")
            release.set()
            assert await call == rpc.Empty()
        finally:
            await asyncio.gather(core.close(), admin.close())


def test_the_server_configuration_holds_no_secret(tmp_path: Path) -> None:
    """NKeys: the server knows public keys only; the seeds stay with their processes."""
    roles = BusCredentials(tmp_path / "credentials").ensure()
    roles.add_gateway(1, "gw")
    text = roles.authorization()
    for role in roles.roles():
        assert roles.seed(role) not in text and roles.public_key(role) in text
    assert (tmp_path / "credentials").stat().st_mode & 0o777 == 0o700
    assert all(roles.path(r).stat().st_mode & 0o777 == 0o600 for r in roles.roles())
