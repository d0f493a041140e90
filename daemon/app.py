"""The root of the daemon: open bus, database and HTTP client, then run the four stages.

``open_daemon`` is an async context manager: on entry every stage has been started with
``tg.start`` (so its consumer is bound and the service answers); on exit it stops them in a
fixed order within ``shutdown_grace_s`` — stop ticking and answering, stop taking commands, let
in-flight runs finish (or hand them back), let the writer finish its batch — then closes the
client, the pool, the bus and any embedded servers, in reverse order of opening.
``run`` adds signals: SIGTERM or SIGINT start that shutdown, and the process exits 0; SIGHUP
reloads the config (``_reload``). Under systemd it notifies ``READY=1`` once every stage has
started, ``WATCHDOG=1`` while healthy and ``STOPPING=1`` on shutdown (``_systemd``).

Roles: a process runs all four stages, or only some (``coleta run --role fetcher,writer``) to
scale them apart; the ticker role includes start-up catch-up, the writer role includes
retention pruning.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from anyio.abc import TaskGroup

from contracts import Subjects
from daemon import __version__, _metrics, _systemd, _tracing
from daemon._bus import FETCH_WAIT_S, Bus, BusOptions
from daemon._clock import Clock, SystemClock
from daemon._db import Database
from daemon._http import open_client
from daemon._logging import get_logger, setup_logging
from daemon._reload import reload_config
from daemon.embedded import embedded_nats, embedded_postgres
from daemon.fetcher import Fetcher
from daemon.retention import prune_forever
from daemon.service import Service
from daemon.settings import Settings
from daemon.ticker import Ticker
from daemon.writer import Writer

__all__ = ["ROLES", "Daemon", "open_daemon", "open_infrastructure", "parse_roles", "run"]

#: The stages a process can run, in start order (downstream first).
ROLES = ("writer", "fetcher", "service", "ticker")

log = get_logger("app")

#: The writer's last fetch ends within its short pull wait; then it writes its batch.
_WRITER_DRAIN_S = FETCH_WAIT_S + 3.0
#: Handing back the runs still in flight takes one message each.
_SETTLE_S = 5.0


def parse_roles(text: str | Iterable[str]) -> frozenset[str]:
    """``"ticker,service"`` → the roles; ValueError naming an unknown one."""
    names = text.split(",") if isinstance(text, str) else list(text)
    roles = frozenset(name.strip() for name in names if name.strip())
    unknown = sorted(roles - set(ROLES))
    if unknown or not roles:
        raise ValueError(f"unknown role {unknown[0]!r}" if unknown else "no role given") from None
    return roles


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
    #: The stages this process runs.
    roles: frozenset[str] = frozenset(ROLES)

    def apply(self, settings: Settings) -> None:
        """Use these settings' sources in every stage from now on (SIGHUP)."""
        self.settings = settings
        self.ticker.reload(settings)
        self.fetcher.reload(settings)
        self.service.reload(settings)


@contextlib.asynccontextmanager
async def open_daemon(
    settings: Settings, *, clock: Clock | None = None, roles: Iterable[str] = ROLES
) -> AsyncIterator[Daemon]:
    """Start the stages of ``roles``; on exit, shut down gracefully within ``shutdown_grace_s``."""
    subjects = Subjects(settings.bus_prefix)
    options = BusOptions(
        max_age_s=settings.stream_max_age_s,
        duplicate_window_s=settings.duplicate_window_s,
        ack_wait_s=settings.ack_wait_s,
        replicas=settings.stream_replicas,
        storage=settings.stream_storage,
    )
    clock = clock or SystemClock()
    roles = parse_roles(roles)
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
            ticker=Ticker(bus, settings, clock, db=db),
            fetcher=Fetcher(bus, http, settings),
            writer=Writer(bus, db, batch_size=settings.writer_batch_size),
            service=Service(bus, db, settings),
            infrastructure=infra,
            roles=roles,
        )
        stages = {
            "writer": daemon.writer.run,
            "fetcher": daemon.fetcher.run,
            "service": daemon.service.run,
            "ticker": daemon.ticker.run,
        }
        async with anyio.create_task_group() as tg:
            # Downstream first, so nothing is published before its consumer is bound.
            for role in ROLES:
                if role in roles:
                    await tg.start(stages[role], name=role)
            if "writer" in roles:
                tg.start_soon(
                    prune_forever,
                    db,
                    lambda: daemon.settings.sources,
                    clock.now,
                    name="retention",
                )
            tg.start_soon(_metrics.sample_consumer_lag, bus, name="metrics-consumer-lag")
            log.info(
                "daemon.ready",
                extra={
                    "version": __version__,
                    "sources": [s.name for s in settings.sources],
                    "prefix": settings.bus_prefix,
                    "roles": [role for role in ROLES if role in roles],
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
    if "fetcher" in daemon.roles:
        with anyio.move_on_after(grace) as scope:
            await daemon.fetcher.drain()
        if scope.cancelled_caught:
            log.warning("daemon.grace_expired", extra={"handed_back": daemon.fetcher.in_flight})
            daemon.fetcher.abort()
            with anyio.move_on_after(_SETTLE_S):
                await daemon.fetcher.finished()
    if "writer" in daemon.roles:
        daemon.writer.stop_intake()
        with anyio.move_on_after(_WRITER_DRAIN_S):
            await daemon.writer.drain()
    tg.cancel_scope.cancel()


async def run(
    settings: Settings, *, config: str | Path | None = None, roles: Iterable[str] = ROLES
) -> int:
    """``coleta run``: the daemon until SIGTERM/SIGINT; SIGHUP reloads ``config``."""
    setup_logging(settings.log_level)
    _tracing.setup_tracing(version=__version__)
    _metrics.setup_metrics(version=__version__)
    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with (
                open_daemon(settings, roles=roles) as daemon,
                anyio.create_task_group() as tg,
            ):
                if (interval := _systemd.watchdog_interval_s()) is not None:
                    tg.start_soon(
                        _systemd.watchdog, daemon_problem(daemon), interval, name="watchdog"
                    )
                _systemd.notify("READY=1", f"STATUS={_summary(daemon)}")
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        _systemd.notify("RELOADING=1", _monotonic_usec())
                        await reload_config(daemon, config)
                        _systemd.notify("READY=1", f"STATUS={_summary(daemon)}")
                        continue
                    log.info("daemon.signal", extra={"signal": signal.Signals(signum).name})
                    break
                _systemd.notify("STOPPING=1", "STATUS=stopping")
                tg.cancel_scope.cancel()
    finally:
        _tracing.shutdown_tracing()
        _metrics.shutdown_metrics()
    log.info("daemon.stopped")
    return 0


def _summary(daemon: Daemon) -> str:
    roles = ",".join(role for role in ROLES if role in daemon.roles)
    return f"running {len(daemon.settings.sources)} sources ({roles})"


def _monotonic_usec() -> str:
    """``MONOTONIC_USEC=…`` as systemd wants with ``RELOADING=1``."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def daemon_problem(daemon: Daemon) -> Callable[[], Awaitable[str | None]]:
    """For the watchdog: None while the bus is connected and the database answers."""

    async def check() -> str | None:
        if not daemon.bus.connected:
            return "not connected to NATS"
        return await daemon.db.ping()

    return check
