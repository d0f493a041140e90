"""The root of the daemon: open bus, database and HTTP client, then run the four stages.

``open_daemon`` is an async context manager: on entry every stage has been started with
``tg.start`` (so its consumer is bound and the service answers); on exit it stops them in a
fixed order within ``shutdown_grace_s`` — stop ticking and answering, stop taking commands, let
in-flight runs finish (or hand them back), let the writer finish its batch — then closes the
client, the pool, the bus and any embedded servers, in reverse order of opening.
``run`` adds signals: SIGTERM or SIGINT start that shutdown, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from anyio.abc import TaskGroup

from contracts import Subjects
from daemon import __version__, _tracing
from daemon._bus import FETCH_WAIT_S, Bus, BusOptions
from daemon._clock import Clock, SystemClock
from daemon._db import Database
from daemon._http import open_client
from daemon._logging import get_logger, setup_logging
from daemon.embedded import embedded_nats, embedded_postgres
from daemon.fetcher import Fetcher
from daemon.service import Service
from daemon.settings import Settings
from daemon.ticker import Ticker
from daemon.writer import Writer

__all__ = ["Daemon", "open_daemon", "open_infrastructure", "run"]

log = get_logger("app")

#: The writer's last fetch ends within its short pull wait; then it writes its batch.
_WRITER_DRAIN_S = FETCH_WAIT_S + 3.0
#: Handing back the runs still in flight takes one message each.
_SETTLE_S = 5.0


@dataclass(frozen=True, slots=True)
class Infrastructure:
    """Where the bus and the database are (embedded or configured)."""

    nats_url: str
    database_url: str
    embedded: tuple[str, ...]


@contextlib.asynccontextmanager
async def open_infrastructure(settings: Settings) -> AsyncIterator[Infrastructure]:
    """The configured servers, or embedded ones under ``state_dir`` for what is not configured."""
    async with contextlib.AsyncExitStack() as stack:
        embedded: list[str] = []
        state_dir = Path(settings.state_dir)
        nats_url = settings.nats_url
        if nats_url is None:
            nats_url = await stack.enter_async_context(embedded_nats(state_dir))
            embedded.append("nats")
        database_url = settings.database_url
        if database_url is None:
            database_url = await stack.enter_async_context(embedded_postgres(state_dir))
            embedded.append("postgres")
        if embedded:
            log.info(
                "embedded.started",
                extra={
                    "servers": embedded,
                    "state_dir": str(state_dir),
                    "nats_url": nats_url if "nats" in embedded else None,
                    "database_url": database_url if "postgres" in embedded else None,
                },
            )
        yield Infrastructure(nats_url, database_url, tuple(embedded))


@dataclass(slots=True)
class Daemon:
    """The running stages, for callers (tests, the CLI) that want to look inside."""

    settings: Settings
    bus: Bus
    db: Database
    http: httpx.AsyncClient
    ticker: Ticker
    fetcher: Fetcher
    writer: Writer
    service: Service
    infrastructure: Infrastructure


@contextlib.asynccontextmanager
async def open_daemon(settings: Settings, *, clock: Clock | None = None) -> AsyncIterator[Daemon]:
    """Start everything; on exit, shut down gracefully within ``shutdown_grace_s``."""
    subjects = Subjects(settings.bus_prefix)
    options = BusOptions(
        max_age_s=settings.stream_max_age_s,
        duplicate_window_s=settings.duplicate_window_s,
        ack_wait_s=settings.ack_wait_s,
    )
    async with contextlib.AsyncExitStack() as stack:
        infra = await stack.enter_async_context(open_infrastructure(settings))
        bus = await stack.enter_async_context(Bus.open(infra.nats_url, subjects, options))
        db = await stack.enter_async_context(
            Database.open(infra.database_url, settings.database_schema)
        )
        http = await stack.enter_async_context(
            open_client(max_connections=max(32, settings.max_concurrent_fetches))
        )
        daemon = Daemon(
            settings=settings,
            bus=bus,
            db=db,
            http=http,
            ticker=Ticker(bus, settings, clock or SystemClock(), db=db),
            fetcher=Fetcher(bus, http, settings),
            writer=Writer(bus, db, batch_size=settings.writer_batch_size),
            service=Service(bus, db, settings),
            infrastructure=infra,
        )
        async with anyio.create_task_group() as tg:
            # Downstream first, so nothing is published before its consumer is bound.
            await tg.start(daemon.writer.run, name="writer")
            await tg.start(daemon.fetcher.run, name="fetcher")
            await tg.start(daemon.service.run, name="service")
            await tg.start(daemon.ticker.run, name="ticker")
            log.info(
                "daemon.ready",
                extra={
                    "version": __version__,
                    "sources": [s.name for s in settings.sources],
                    "prefix": settings.bus_prefix,
                },
            )
            try:
                yield daemon
            finally:
                with anyio.CancelScope(shield=True):
                    await _shutdown(daemon, tg)


async def _shutdown(daemon: Daemon, tg: TaskGroup) -> None:
    """Stop intake, let in-flight work finish within the grace period, then cancel the rest."""
    grace = daemon.settings.shutdown_grace_s
    log.info("daemon.stopping", extra={"grace_s": grace, "in_flight": daemon.fetcher.in_flight})
    daemon.ticker.stop()
    with anyio.move_on_after(grace) as scope:
        await daemon.fetcher.drain()
    if scope.cancelled_caught:
        log.warning("daemon.grace_expired", extra={"handed_back": daemon.fetcher.in_flight})
        daemon.fetcher.abort()
        with anyio.move_on_after(_SETTLE_S):
            await daemon.fetcher.finished()
    daemon.writer.stop_intake()
    with anyio.move_on_after(_WRITER_DRAIN_S):
        await daemon.writer.drain()
    tg.cancel_scope.cancel()


async def run(settings: Settings) -> int:
    """``coleta run``: the daemon until SIGTERM/SIGINT; returns the exit code."""
    setup_logging(settings.log_level)
    _tracing.setup_tracing(version=__version__)
    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with open_daemon(settings):
                async for signum in signals:
                    log.info("daemon.signal", extra={"signal": signal.Signals(signum).name})
                    break
    finally:
        _tracing.shutdown_tracing()
    log.info("daemon.stopped")
    return 0
