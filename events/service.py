"""Process plumbing shared by the services: periodic jobs, orderly stops, `main`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from events.logs import configure_logging
from events.settings import BusSettings


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C), for a clean shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def every(interval_s: float, job: Callable[[], Awaitable[object]], what: str, log: logging.Logger) -> None:
    """Run `job` every `interval_s` seconds for ever; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)


async def cancel_all(tasks: Iterable[asyncio.Task[object]]) -> None:
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_signalled(name: str, settings: BusSettings, service: Service) -> None:
    """The `main` of a service process: log set-up, start, wait for SIGTERM/Ctrl-C, stop."""
    configure_logging(name, settings.log_level)
    stop = stop_event()
    await service.start()
    await stop.wait()
    logging.getLogger(name).info("%s stopping", name)
    await service.stop()
