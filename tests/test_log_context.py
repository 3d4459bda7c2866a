"""Every subscriber of a service keeps the log context FastStream would build for each
message (its subject, queue, stream and the message's id), made once instead of per
message (events.bus.log_context_once)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from core_service.app import Core
from core_service.settings import CoreSettings
from events import streams


async def test_every_core_subscriber_gives_faststreams_own_log_context_for_each_message(nats_url: str, tmp_path: Path) -> None:
    core = Core(CoreSettings(nats_url=nats_url, state_dir=tmp_path))
    await core.start()
    try:
        assert core.bus is not None
        subscribers = list(core.bus.broker.subscribers)
        assert len(subscribers) > 10  # the RPC endpoints and the stream consumers
        seen_streams = set()
        for subscriber in subscribers:
            assert "get_log_context" in vars(subscriber), subscriber  # made once for this one
            for message_id in ("first", "second", "first"):
                message = SimpleNamespace(message_id=message_id)
                kept = subscriber.get_log_context(message)
                assert kept == type(subscriber).get_log_context(subscriber, message)
                assert kept["message_id"] == message_id and kept["subject"]
            seen_streams.add(kept["stream"])
        assert {"", streams.PEERS.name} <= seen_streams  # core subscribers and stream consumers alike
    finally:
        await core.stop()
