"""Process plumbing shared by the services: periodic jobs, orderly stops, `main`."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from runtime.logs import configure_logging
from runtime.settings import BusSettings


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


STOP_TIMEOUT_S = 10.0


# Net new container objects between two young-generation collections (CPython's default
# is 700). A login's objects die young by reference counting, so at the default the
# collector ran about 50 times a second under load for little: at 10 000 it runs about
# once in ten seconds.
YOUNG_GENERATION_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Once the process has started: take what it made while starting (its modules, the
    app, the libraries' caches; about 215 000 objects in the core) out of the garbage
    collector's sight, and collect the young generation less often. Before, a full
    collection traversed all of them every few seconds under load, 110 ms each with the
    event loop stopped, and the collector took 5 % of the core's CPU during logins and
    17 % while an administrator enrolled users. Garbage the start left is collected first,
    so that none of it is kept for good."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


async def run_until_signalled(name: str, settings: BusSettings, service: Service) -> None:
    """The `main` of a service process: log set-up, start, wait for SIGTERM/Ctrl-C, stop.
    A signal during the start ends it too: a start can wait a long time (for NATS, for the
    core's streams), and a process told to stop, for instance because `wgmfa up` died and
    NATS with it, must not wait for ever."""
    configure_logging(name, settings.log_level)
    log = logging.getLogger(name)
    stop = stop_event()
    log.info("%s starting", name)  # from here a SIGTERM stops it in order
    starting = asyncio.create_task(service.start())
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # a failed start fails the process
        settle_garbage_collector()
        await signalled
    else:
        log.info("%s stopping before it finished starting", name)
        await cancel_all([starting])
    signalled.cancel()
    log.info("%s stopping", name)
    try:
        await asyncio.wait_for(service.stop(), STOP_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.warning("%s did not stop within %g s; exiting anyway", name, STOP_TIMEOUT_S)
