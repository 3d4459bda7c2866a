"""Every service's /metrics, scraped over HTTP from the running processes: a login, a
revoke and a dead-lettered message move the figures an operator alerts on. And the
Grafana dashboard in deploy/ only asks for metrics that exist."""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pyotp
from faststream.prometheus.container import MetricsContainer
from faststream.prometheus.manager import MetricsManager
from faststream.prometheus.types import ProcessingStatus
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from events import nats_direct, subjects
from events.bus import Bus, MessageMetrics, SeriesOnce
from schemas import rpc
from schemas.common import RevokeReason
from schemas.events import PeerRevoked
from tests.support.stack import REPO, SecuredNats, ServiceProcess, Stack, eventually, free_port

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
SERVICES = ("core", "proxy", "reaper", "gateway")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 for a labelled series that has not been counted yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (sample, _), v in samples.items() if sample == name)


def handlers(samples: Samples) -> set[str]:
    """The subjects FastStream's own series are labelled with."""
    return {dict(labels)["handler"] for (name, labels), _ in samples.items()
            if name.startswith("faststream_") and "handler" in dict(labels)}


class Scraper:
    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.http = httpx.AsyncClient(timeout=10)

    async def scrape(self, service: str) -> Samples:
        response = await self.http.get(f"http://127.0.0.1:{self.ports[service]}/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return parse(response.text)

    async def answering(self, service: str) -> bool:
        try:
            await self.scrape(service)
            return True
        except httpx.HTTPError:
            return False

    async def until(self, service: str, check, what: str, timeout: float = 30.0) -> Samples:  # type: ignore[no-untyped-def]
        """Scrape `service` until `check(samples)` holds."""

        async def scraped() -> Samples | None:
            samples = await self.scrape(service)
            return samples if check(samples) else None

        return await eventually(scraped, timeout=timeout, interval=0.2, what=f"{service}: {what}")


async def test_a_login_a_revoke_and_a_dead_letter_move_every_services_metrics(nats_server: SecuredNats, tmp_path: Path) -> None:
    ports = {service: free_port() for service in SERVICES}
    # a 3 s threshold floor, so the reaper revokes a never-connected peer within seconds
    stack = Stack(nats_server.url, tmp_path, core_metrics_port=str(ports["core"]), metrics_port=str(ports["proxy"]),
                  min_threshold_s="1", stats_interval="1", default_threshold_s="3", rate_limit_per_s="0")
    scraper = Scraper(ports)
    await stack.start()
    try:
        assert stack.admin is not None
        # location "watched": the reaper revokes its peers 3 s after authorization (no
        # gateway reports a handshake); location "office": a gateway applies its peers
        office = await stack.add_location("office", network="10.61.0.0/24", threshold_s=3600)
        watched = await stack.add_location("watched", network="10.62.0.0/24")
        secret = await stack.add_user_with_totp("alice")
        _, laptop = await stack.add_device("alice", "laptop", "office")
        other_secret = await stack.add_user_with_totp("bob")  # a TOTP code is good for one login
        _, phone = await stack.add_device("bob", "phone", "watched")

        reaper = ServiceProcess("reaper_worker", dict(stack.env, WGMFA_REAPER_METRICS_PORT=str(ports["reaper"]),
                                                      WGMFA_SWEEP_INTERVAL_S="1"), tmp_path / "reaper.log")
        credentials = tmp_path / "office.json"
        credentials.write_text(stack.admin.reply_key.open(office.credentials_sealed))
        stack.allow_gateway(office.location.id, "gw1")
        gateway = ServiceProcess("gateway_worker", dict(stack.env, WGMFA_GATEWAY_METRICS_PORT=str(ports["gateway"]),
                                                        WGMFA_BACKEND="fake"), tmp_path / "gateway.log",
                                 args=["--credentials", str(credentials), "--gateway-id", "gw1"])
        stack.extra += [reaper, gateway]
        reaper.start()
        gateway.start()
        for service in SERVICES:
            await eventually(lambda s=service: scraper.answering(s), timeout=30, what=f"the {service}'s /metrics")
        await scraper.until("gateway", lambda s: value(s, "wgmfa_gateway_apply_seconds_count", action="sync") >= 1,
                            "its first sync")
        await eventually(lambda: "reaper ready" in reaper.log(), timeout=30, what="the reaper")
        before = {service: await scraper.scrape(service) for service in SERVICES}

        # --- a login, and a wrong code ------------------------------------------------------
        started = await stack.http.post("/api/v1/client-mfa/start",
                                        json={"location_id": office.location.id, "pubkey": laptop.pubkey, "method": 0})
        finished = await stack.http.post("/api/v1/client-mfa/finish",
                                         json={"token": started.json()["token"], "code": pyotp.TOTP(secret).now()})
        assert finished.status_code == 200, finished.text
        retry = await stack.http.post("/api/v1/client-mfa/start",
                                      json={"location_id": office.location.id, "pubkey": laptop.pubkey, "method": 0})
        wrong = await stack.http.post("/api/v1/client-mfa/finish", json={"token": retry.json()["token"], "code": "000000"})
        assert wrong.status_code == 401, wrong.text

        core = await scraper.scrape("core")
        logins = "wgmfa_logins_total"
        assert value(core, logins, method="totp", outcome="success") == value(before["core"], logins, method="totp",
                                                                               outcome="success") + 1
        assert value(core, logins, method="totp", outcome="wrong_code") == value(
            before["core"], logins, method="totp", outcome="wrong_code") + 1
        assert value(core, "wgmfa_login_seconds_count", method="totp") == value(
            before["core"], "wgmfa_login_seconds_count", method="totp") + 1
        await scraper.until("core", lambda s: value(s, "wgmfa_live_sessions", location="office") == 1,
                            "one live session at the office")
        await scraper.until("gateway", lambda s: value(s, "wgmfa_gateway_apply_seconds_count", action="authorize")
                            == value(before["gateway"], "wgmfa_gateway_apply_seconds_count", action="authorize") + 1,
                            "the authorization applied")
        # FastStream's own counters: the core answered both RPCs of each login, the gateway
        # took the peer state from its stream
        received = "faststream_received_messages_total"
        assert total(core, received) >= total(before["core"], received) + 4
        await scraper.until("gateway", lambda s: total(s, received) > total(before["gateway"], received),
                            "the gateway's subscriber counted")
        proxy = await scraper.scrape("proxy")
        assert total(proxy, "wgmfa_proxy_requests_total") >= total(before["proxy"], "wgmfa_proxy_requests_total") + 4

        # --- an operator's revoke -----------------------------------------------------------
        sessions = (await stack.admin.call("sessions", rpc.SessionsRequest(location="office", include_revoked=False),
                                           rpc.SessionsResult)).sessions
        await stack.admin.call("revoke", rpc.RevokeRequest(session_id=sessions[0].id), rpc.SessionInfo)
        revoked = "wgmfa_sessions_revoked_total"
        core = await scraper.scrape("core")
        assert value(core, revoked, reason="admin") == value(before["core"], revoked, reason="admin") + 1
        await scraper.until("core", lambda s: value(s, "wgmfa_live_sessions", location="office") == 0,
                            "no live session at the office")
        await scraper.until("gateway", lambda s: value(s, "wgmfa_gateway_apply_seconds_count", action="revoke")
                            == value(before["gateway"], "wgmfa_gateway_apply_seconds_count", action="revoke") + 1,
                            "the revoke applied")

        # --- the reaper's revoke of a peer that never connected --------------------------------
        started = await stack.http.post("/api/v1/client-mfa/start",
                                        json={"location_id": watched.location.id, "pubkey": phone.pubkey, "method": 0})
        finished = await stack.http.post("/api/v1/client-mfa/finish",
                                         json={"token": started.json()["token"], "code": pyotp.TOTP(other_secret).now()})
        assert finished.status_code == 200, finished.text
        reaped = "wgmfa_reaper_revokes_total"
        reaper_now = await scraper.until(
            "reaper", lambda s: value(s, reaped, reason="never_connected")
            == value(before["reaper"], reaped, reason="never_connected") + 1, "the reaper's revoke")
        assert value(reaper_now, reaped, reason="idle") == value(before["reaper"], reaped, reason="idle")
        # the core ends the session it names, and counts it under the reaper's reason
        await scraper.until("core", lambda s: value(s, revoked, reason="never_connected")
                            == value(before["core"], revoked, reason="never_connected") + 1, "the session ended")
        # the reaper sweeps every second and reads the gateway's samples as they come
        assert 0 <= value(reaper_now, "wgmfa_reaper_sweep_age_seconds") < 60
        assert ("wgmfa_reaper_ingest_lag_seconds", frozenset()) in reaper_now

        # --- dead letters -------------------------------------------------------------------
        harness = await Bus.connect(stack.nats_url, "test-harness", wait_s=5)
        try:
            await nats_direct.client(harness.broker).request(subjects.RPC_MFA_START, b"{not json", timeout=10)
            await nats_direct.client(harness.broker).publish(subjects.peer(office.location.id, 900), b"\x00\xff")
            # well formed, but for another location on the office's subject: the gateway
            # cannot apply it, and gives up on it at once
            wrong_place = PeerRevoked(location_id=office.location.id + 100, device_id=901, generation=1,
                                      pubkey=laptop.pubkey, reason=RevokeReason.ADMIN)
            await nats_direct.client(harness.broker).publish(subjects.peer(office.location.id, 901), wrong_place.model_dump_json().encode())
            await nats_direct.client(harness.broker).flush()
        finally:
            await harness.close()
        letters = "wgmfa_dead_letters_total"
        await scraper.until("core", lambda s: value(s, letters, service="core", subject="wgmfa.rpc")
                            == value(before["core"], letters, service="core", subject="wgmfa.rpc") + 1,
                            "the malformed request dead-lettered")
        await scraper.until("reaper", lambda s: value(s, letters, service="reaper", subject="wgmfa.peer")
                            == value(before["reaper"], letters, service="reaper", subject="wgmfa.peer") + 1,
                            "the undecodable peer state dead-lettered")
        gateway_now = await scraper.until(
            "gateway", lambda s: value(s, letters, service="gateway gw1", subject="wgmfa.peer")
            == value(before["gateway"], letters, service="gateway gw1", subject="wgmfa.peer") + 2,
            "both bad peer states dead-lettered")
        failures = "wgmfa_gateway_apply_failures_total"
        assert value(gateway_now, failures, action="revoke") == value(before["gateway"], failures, action="revoke") + 1
        # FastStream's series are per subject template, not per device: three devices'
        # peer states reached the gateway and two the core, under one handler label each
        assert handlers(gateway_now) == {subjects.PEER_TEMPLATE}
        core = await scraper.scrape("core")
        assert subjects.PEER_TEMPLATE in handlers(core)
        assert {h for h in handlers(core) if h.startswith(subjects.PEER_PREFIX)} == {subjects.PEER_TEMPLATE}
        assert subjects.RPC_MFA_START in handlers(core)
        # the proxy serves the same dead-letter family (it has nothing to give up on here)
        assert "# TYPE wgmfa_dead_letters_total counter" in (await scraper.http.get(
            f"http://127.0.0.1:{ports['proxy']}/metrics")).text
    finally:
        await scraper.http.aclose()
        await stack.stop()


# --- the dashboard ----------------------------------------------------------------------------


def registered_metric_names() -> set[str]:
    """Every sample name the services' registries can produce."""
    from prometheus_client import CollectorRegistry

    from core_service.metrics import registry as core
    from gateway_worker.metrics import registry as gateway
    from proxy_service.app import create_app
    from proxy_service.settings import ProxySettings
    from reaper_worker.metrics import registry as reaper

    proxy = CollectorRegistry()
    create_app(ProxySettings(), registry=proxy)
    names = set()
    for registry in (core, gateway, reaper, proxy):
        # what the bus adds to each service's registry when it connects (events.bus)
        MessageMetrics(registry, "dashboard")
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    return names


def test_the_grafana_dashboard_queries_only_metrics_the_services_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    variables = dashboard["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    exported = registered_metric_names()
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried.update(re.findall(r"\b(?:wgmfa|faststream)_[a-z_]+", target["expr"]))
    assert queried, "the dashboard queries nothing"
    assert queried <= exported, f"the dashboard asks for metrics no service exports: {sorted(queried - exported)}"
    # and it shows every domain metric the services export
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in queried}
    for name in ("wgmfa_logins", "wgmfa_login_seconds", "wgmfa_live_sessions", "wgmfa_sessions_revoked",
                 "wgmfa_reaper_revokes", "wgmfa_reaper_sweep_age_seconds", "wgmfa_reaper_ingest_lag_seconds",
                 "wgmfa_gateway_apply_seconds", "wgmfa_gateway_apply_failures", "wgmfa_dead_letters",
                 "faststream_received_processed_messages", "faststream_received_processed_messages_duration_seconds"):
        assert name in families, name


def test_the_services_metrics_manager_writes_the_series_faststreams_own_writes() -> None:
    """MessageMetrics keeps each series it looked up (SeriesOnce); what it exports must be
    what FastStream's manager exports for the same messages, series by series."""
    exported = []
    for manager_type in (MetricsManager, SeriesOnce):
        registry = CollectorRegistry()
        manager = manager_type(MetricsContainer(registry, custom_label_names=()), app_name="core")
        for handler, size, status, error in [
            ("wgmfa.rpc.mfa.start", 120, ProcessingStatus.acked, None),
            ("wgmfa.rpc.mfa.start", 90, ProcessingStatus.acked, None),
            ("wgmfa.peer.{location_id}.{device_id}", 400, ProcessingStatus.nacked, "BackendError"),
            ("wgmfa.peer.{location_id}.{device_id}", 400, ProcessingStatus.rejected, "PermanentFailure"),
        ]:
            manager.add_received_message(broker="nats", handler=handler)
            manager.observe_received_messages_size(broker="nats", handler=handler, size=size)
            manager.add_received_message_in_process(broker="nats", handler=handler)
            if error is not None:
                manager.add_received_processed_message_exception(broker="nats", handler=handler, exception_type=error)
            manager.observe_received_processed_message_duration(duration=0.004, broker="nats", handler=handler)
            manager.remove_received_message_in_process(broker="nats", handler=handler)
            manager.add_received_processed_message(broker="nats", handler=handler, status=status)
        exported.append({series: v for series, v in parse(generate_latest(registry).decode()).items()
                         if not series[0].endswith("_created")})  # when each series was made
    faststreams, ours = exported
    assert value(ours, "faststream_received_messages_total", app_name="core", broker="nats",
                 handler="wgmfa.rpc.mfa.start") == 2
    assert ours == faststreams
