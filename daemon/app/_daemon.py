"""The daemon: its bus, database and HTTP client opened, its stages started; stopped within
one deadline.

``open_daemon`` is an async context manager: on entry every stage of the process's roles has
been started with ``tg.start`` (so its consumer is bound and the service answers), downstream
first; on exit it stops them in a fixed order within one deadline, ``shutdown_grace_s`` —
stop ticking, let the fetcher finish the runs in hand and the writer write what they
published, then cancel whatever is left (a run still going hands its command back) — and
closes the client, the pool, the bus and any embedded servers, in reverse order of opening.
Every secret of the settings is masked in whatever the process says (``redact``) from before
the first server is opened.

Roles: a process runs all four stages, or only some (``coleta run --role fetcher,writer``) to
scale them apart; the ticker role includes start-up catch-up, the writer role includes
retention pruning. With ``workers`` (``_workers``), the daemon also starts and supervises
worker processes once its own stages run, and stops them within the same deadline; a worker
itself opens the daemon with ``attach``: the embedded servers are its main process's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import anyio
import httpx
from anyio.abc import TaskGroup

from contracts import Subjects
from daemon import __version__
from daemon.app._workers import Workers
from daemon.errors import ColetaError, EmbeddedServerError
from daemon.fetcher import Fetcher, fetch_max_deliver, open_client
from daemon.platform import metrics, phase, redact
from daemon.platform.bus import Bus, BusOptions
from daemon.platform.clock import Clock, SystemClock
from daemon.platform.db import Database
from daemon.platform.dead_letters import DeadLetters
from daemon.platform.embedded import embedded_nats, embedded_postgres, read_state_urls
from daemon.platform.logs import get_logger
from daemon.platform.nats_auth import NatsAuth
from daemon.service import Service
from daemon.settings import ROLES, Settings, parse_roles, secrets_of
from daemon.ticker import Ticker
from daemon.writer import Writer, prune_forever

__all__ = ["Daemon", "Infrastructure", "mask_secrets", "open_daemon", "open_infrastructure"]

log = get_logger("app")


@dataclass(frozen=True, slots=True)
class Infrastructure:
    """Where the bus and the database are (embedded or configured)."""

    nats_url: str
    database_url: str
    embedded: tuple[str, ...]
    #: How to authenticate to ``nats_url``: the configured credentials, or the embedded's.
    nats_auth: NatsAuth = field(default_factory=NatsAuth)


@contextlib.asynccontextmanager
async def open_infrastructure(
    settings: Settings, *, attach: bool = False
) -> AsyncIterator[Infrastructure]:
    """The configured servers, or embedded ones under ``state_dir`` for what is not configured:
    started here, or with ``attach`` (a worker process) those its main process started."""
    if attach:
        yield _attached(settings)
        return
    async with contextlib.AsyncExitStack() as stack:
        embedded: list[str] = []
        state_dir = Path(settings.state_dir)
        nats_url, nats_auth = settings.nats_url, settings.nats_auth()
        if nats_url is None:
            phase.waiting_for(f"the embedded nats-server in {state_dir} to start")
            server = await stack.enter_async_context(embedded_nats(state_dir))
            nats_url, nats_auth = server.url, server.auth
            embedded.append("nats")
        database_url = settings.database_url
        if database_url is None:
            phase.waiting_for(f"the embedded PostgreSQL in {state_dir} to start")
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
        yield Infrastructure(nats_url, database_url, tuple(embedded), nats_auth)


def _attached(settings: Settings) -> Infrastructure:
    """A worker's servers: the configured ones, or the embedded servers of its main process,
    found in the state directory as client commands find them."""
    nats_url, nats_auth = settings.nats_url, settings.nats_auth()
    database_url = settings.database_url
    if nats_url is None or database_url is None:
        state_dir = Path(settings.state_dir)
        found = read_state_urls(state_dir)
        if nats_url is None:
            if found.nats_url is None or found.nats_auth is None:
                raise EmbeddedServerError(
                    f"no embedded nats-server running in {state_dir} to attach to",
                    server="nats-server",
                )
            nats_url, nats_auth = found.nats_url, found.nats_auth
        if database_url is None:
            if found.database_url is None:
                raise EmbeddedServerError(
                    f"no embedded PostgreSQL running in {state_dir} to attach to",
                    server="postgres",
                )
            database_url = found.database_url
    return Infrastructure(nats_url, database_url, (), nats_auth)


@dataclass(slots=True)
class Daemon:
    """The running stages, for callers (tests, the CLI) that want to look inside; what a
    reload acts on (``_reload.Reloadable``)."""

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
    #: The secrets masked in everything the process says (``redact``).
    redaction: redact.Registration = field(default_factory=redact.Registration)
    #: The worker processes this one supervises (``coleta run --workers``), if any.
    workers: Workers | None = None

    def apply(self, settings: Settings) -> None:
        """Use these settings' sources in every stage from now on (SIGHUP), and mask their
        secrets."""
        mask_secrets(self.redaction, settings)
        self.settings = settings
        self.ticker.reload(settings)
        self.fetcher.reload(settings)
        self.service.reload(settings)

    async def bus_fits_sources(self) -> None:
        """Let the fetcher's consumer deliver a command as often as the largest retry budget
        of the sources needs (a reload may have raised one); failing is logged."""
        wanted = fetch_max_deliver(self.settings)
        if wanted <= self.bus.options.fetch_max_deliver:
            return
        self.bus.options = dataclasses.replace(self.bus.options, fetch_max_deliver=wanted)
        try:
            await self.bus.declare()
        except ColetaError as exc:
            log.error("config.consumer_not_updated", extra={"error": str(exc)})


@contextlib.asynccontextmanager
async def open_daemon(
    settings: Settings,
    *,
    clock: Clock | None = None,
    roles: Iterable[str] = ROLES,
    workers: Workers | None = None,
    attach: bool = False,
) -> AsyncIterator[Daemon]:
    """Start the stages of ``roles``, then ``workers``; on exit, shut down gracefully within
    ``shutdown_grace_s``. ``attach``: use the embedded servers another process started."""
    subjects = Subjects(settings.bus_prefix)
    options = BusOptions(
        max_age_s=settings.stream_max_age_s,
        duplicate_window_s=settings.duplicate_window_s,
        ack_wait_s=settings.ack_wait_s,
        max_deliver=settings.max_deliveries,
        fetch_max_deliver=fetch_max_deliver(settings),
        replicas=settings.stream_replicas,
        storage=settings.stream_storage,
    )
    clock = clock or SystemClock()
    roles = frozenset(roles)
    if roles or workers is None:  # with workers, this process may run no stage itself
        roles = parse_roles(roles)
    async with contextlib.AsyncExitStack() as stack:
        # Before anything can log, publish or store a text holding one of them.
        redaction = stack.enter_context(redact.registered())
        mask_secrets(redaction, settings)
        infra = await stack.enter_async_context(open_infrastructure(settings, attach=attach))
        if infra.nats_auth.password:  # the embedded server's generated one, too
            redaction.update([redact.Secret("nats password", infra.nats_auth.password)])
        timeout_s = settings.connect_timeout_s
        bus = await stack.enter_async_context(
            Bus.open(
                infra.nats_url,
                subjects,
                options,
                connect_timeout_s=timeout_s,
                auth=infra.nats_auth,
            )
        )
        db = await stack.enter_async_context(
            Database.open(infra.database_url, settings.database_schema, connect_timeout_s=timeout_s)
        )
        http = await stack.enter_async_context(
            open_client(max_connections=max(32, settings.max_concurrent_fetches))
        )
        dead_letters = DeadLetters(bus)
        daemon = Daemon(
            settings=settings,
            bus=bus,
            db=db,
            http=http,
            ticker=Ticker(bus, settings, clock, db=db),
            fetcher=Fetcher(bus, http, settings, dead_letters=dead_letters),
            writer=Writer(
                bus, db, batch_size=settings.writer_batch_size, dead_letters=dead_letters
            ),
            service=Service(bus, db, settings, clock=clock),
            infrastructure=infra,
            roles=roles,
            redaction=redaction,
            workers=workers,
        )
        stages = {
            "writer": daemon.writer.run,
            "fetcher": daemon.fetcher.run,
            "service": daemon.service.run,
            "ticker": daemon.ticker.run,
        }
        async with anyio.create_task_group() as tg:
            if roles & {"fetcher", "writer"}:
                # Dead letters of both stages, and the max-deliveries advisories.
                await tg.start(dead_letters.run, name="dead-letters")
            # Downstream first, so nothing is published before its consumer is bound.
            for role in ROLES:
                if role in roles:
                    phase.waiting_for(f"the {role} to start")
                    await tg.start(stages[role], name=role)
            if "writer" in roles:
                tg.start_soon(
                    prune_forever,
                    db,
                    lambda: daemon.settings.sources,
                    clock.now,
                    name="retention",
                )
            tg.start_soon(metrics.sample_consumer_lag, bus, name="metrics-consumer-lag")
            if workers is not None:
                if "service" in roles:
                    daemon.service.watch("workers", workers.health)
                phase.waiting_for(f"{workers.count} worker processes to start")
                await tg.start(workers.run, name="workers")
            phase.waiting_for(None)
            log.info(
                "daemon.ready",
                extra={
                    "version": __version__,
                    "sources": [s.name for s in settings.sources],
                    "prefix": settings.bus_prefix,
                    "roles": [role for role in ROLES if role in roles],
                    "workers": workers.count if workers is not None else 0,
                },
            )
            try:
                yield daemon
            finally:
                with anyio.CancelScope(shield=True):
                    await _shutdown(daemon, tg)


def mask_secrets(redaction: redact.Registration, settings: Settings) -> None:
    """Mask every secret ``settings`` hold in all the process says from now on; warn about
    those too short to be masked by value (they are masked by name only), and about those
    whose value is also a name the configuration shows everywhere (the bus prefix, a source,
    a user: ``postgresql://coleta:coleta@…``): masking those would hide nothing and mangle
    every subject and log line, so they too are masked by name only."""
    names = _public_names(settings)
    secrets = secrets_of(settings)
    named = sorted({s.where for s in secrets if s.value.lower() in names})
    short = redaction.update(s for s in secrets if s.value.lower() not in names)
    if short:
        log.warning(
            "secrets.too_short",
            extra={
                "keys": short,
                "min_chars": redact.MIN_CHARS,
                "masked": "only as the parameter or header they are sent in",
            },
        )
    if named:
        log.warning(
            "secrets.same_as_a_name",
            extra={
                "keys": named,
                "masked": "only as the parameter, header or URL part they are sent in",
                "advice": "use a secret that is not also the bus prefix, a source or a user",
            },
        )


def _public_names(settings: Settings) -> set[str]:
    """Names the configuration shows in subjects, streams, tables and URLs."""
    names = {settings.bus_prefix, settings.database_schema}
    names.update(source.name for source in settings.sources)
    for url in (settings.nats_url, settings.database_url):
        for server in (url or "").split(","):
            try:
                user = urlsplit(server.strip()).username
            except ValueError:
                continue
            if user:
                names.add(unquote(user))
    if settings.nats_user:
        names.add(settings.nats_user)
    return {name.lower() for name in names if name}


async def _shutdown(daemon: Daemon, tg: TaskGroup) -> None:
    """Stop intake and let in-flight work finish, all within ``shutdown_grace_s``; then
    cancel the rest (a run still going hands its command back, the writer its batch).

    Worker processes are asked first and drain beside this one, within their own grace; they
    get ``Workers.close_s`` more to close, then what is left is killed (the servers they use, when
    embedded, stop only after them)."""
    grace = daemon.settings.shutdown_grace_s
    log.info("daemon.stopping", extra={"grace_s": grace, "in_flight": daemon.fetcher.in_flight})
    daemon.ticker.stop()
    if daemon.workers is not None:
        await daemon.workers.stop()
    with anyio.move_on_after(grace) as graceful:
        if "fetcher" in daemon.roles:
            await daemon.fetcher.drain()
        if "writer" in daemon.roles:
            # After the fetcher: what its last runs published is written too.
            daemon.writer.stop_intake()
            await daemon.writer.drain()
        if daemon.workers is not None:
            await daemon.workers.wait()
    if graceful.cancelled_caught:
        log.warning("daemon.grace_expired", extra={"handed_back": daemon.fetcher.in_flight})
        if daemon.workers is not None:
            with anyio.move_on_after(daemon.workers.close_s):
                await daemon.workers.wait()
    tg.cancel_scope.cancel()
