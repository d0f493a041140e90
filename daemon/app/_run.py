"""``coleta run``: the daemon in a process, with signals from its first moment.

SIGTERM or SIGINT during start-up (embedded servers starting, the first NATS or PostgreSQL
connection being retried, migrations waiting for their lock) cancels start-up and closes what
had opened; once running, it starts the graceful shutdown (``open_daemon``). Either way the
process exits 0 and the ``daemon.signal`` line says what start-up was waiting for (``phase``).
SIGHUP reloads the config (``_reload``), and passes a valid one on to the worker processes.
Under systemd it notifies ``READY=1`` once every stage has started, ``WATCHDOG=1`` while
healthy and ``STOPPING=1`` on shutdown (``systemd``).

With ``workers`` above 1 it starts and supervises that many worker processes (``_workers``),
which fetch and write, and runs only its other roles (ticker, service) itself. A worker
(``--worker-index``) attaches to its main process's embedded servers, tags every log line with
its index, says ``ready`` on its channel once started, and takes ``reload`` and ``stop`` from
it like SIGHUP and SIGTERM; end-of-file on the channel (its main process died) stops it too.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import UNIXSocketStream

from daemon import __version__
from daemon.app._channel import READY, RELOAD, STOP, lines, open_parent_channel, send_line
from daemon.app._daemon import Daemon, open_daemon
from daemon.app._reload import reload_config
from daemon.app._workers import WORKER_ROLES, Workers, worker_command
from daemon.platform import metrics, phase, systemd, tracing
from daemon.platform.logs import get_logger, setup_logging
from daemon.settings import ROLES, Settings, load_settings, with_workers

__all__ = ["daemon_problem", "run"]

log = get_logger("app")


@dataclass(slots=True)
class _Lifecycle:
    """What the signal task acts on: the scope start-up runs in, the scope the running daemon
    waits in, and the daemon once it has started (for SIGHUP)."""

    config: str | Path | None
    waiting: phase.Phase
    #: ``coleta run --workers``: it wins over every config read, at a reload too.
    workers: str | None = None
    starting: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    serving: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    daemon: Daemon | None = None
    stopping: bool = False

    def load(self, path: str | Path | None) -> Settings:
        """The config at ``path``, as ``coleta run`` read it at start (``--workers`` over it)."""
        settings = load_settings(path)
        return settings if self.workers is None else with_workers(settings, self.workers)

    def stop(self) -> None:
        """During start-up, cancel it: what had opened closes on the way out. Once running,
        end the wait: ``open_daemon`` then shuts down gracefully, not cancelled."""
        self.stopping = True
        (self.starting if self.daemon is None else self.serving).cancel()


async def run(
    settings: Settings,
    *,
    config: str | Path | None = None,
    roles: Iterable[str] = ROLES,
    worker_index: int | None = None,
    workers: str | None = None,
) -> int:
    """``coleta run``: the daemon until SIGTERM/SIGINT; SIGHUP reloads ``config`` (with
    ``workers``, ``--workers``, over it, as in ``settings``).

    The signal task starts before anything can block and lives beside start-up and serving
    in one task group, so a signal is acted on at every moment; so does a worker's channel
    (``worker_index``). Errors propagate: ``cli.main`` turns them into the exit code.
    """
    tag = {"worker": worker_index} if worker_index is not None else None
    setup_logging(settings.log_level, fields=tag)
    roles = frozenset(roles)
    with (
        phase.watching() as waiting,
        anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
    ):
        life = _Lifecycle(config, waiting, workers)
        channel = await open_parent_channel() if worker_index is not None else None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_on_signals, signals, life, name="signals")
                if channel is not None:
                    tg.start_soon(_follow_parent, channel, life, name="parent-channel")
                tracing.setup_tracing(version=__version__)
                metrics.setup_metrics(version=__version__)
                # A worker starts none of its own.
                children = _workers(settings, config) if channel is None else None
                if children is not None:
                    roles = roles - WORKER_ROLES  # the workers fetch and write
                await _serve(settings, roles, life, children, channel)
                tg.cancel_scope.cancel()
        finally:
            tracing.shutdown_tracing()
            metrics.shutdown_metrics()
            if channel is not None:
                await channel.aclose()
    log.info("daemon.stopped")
    return 0


def _workers(settings: Settings, config: str | Path | None) -> Workers | None:
    """The worker processes to start beside this one (``workers``, from 2), which then
    fetches and writes nothing itself: a main process that also fetched answered triggers
    and ticked late, and the fan-out benchmark ran slower with it than without workers."""
    count = settings.worker_processes
    if count < 2:
        return None
    path = str(config) if config is not None else None
    return Workers(count, lambda index: worker_command(path, settings.workers, index))


async def _serve(
    settings: Settings,
    roles: Iterable[str],
    life: _Lifecycle,
    workers: Workers | None,
    channel: UNIXSocketStream | None,
) -> None:
    """Start the daemon in ``life.starting``, then run it until ``life.serving`` is cancelled.

    Cancelled during start-up, ``open_daemon`` closes what had opened (the bus, the pool,
    embedded servers, workers) on its way out. Once started, only ``life.serving`` is
    cancelled: ``open_daemon`` then exits normally, with its graceful shutdown in the fixed
    order. A worker (``channel``) tells its main process it is ready.
    """
    with life.starting:
        async with open_daemon(
            settings, roles=roles, workers=workers, attach=channel is not None
        ) as daemon:
            life.daemon = daemon
            with life.serving:
                async with anyio.create_task_group() as tg:
                    if (interval := systemd.watchdog_interval_s()) is not None:
                        tg.start_soon(
                            systemd.watchdog, daemon_problem(daemon), interval, name="watchdog"
                        )
                    systemd.notify("READY=1", f"STATUS={_summary(daemon)}")
                    if channel is not None:
                        await send_line(channel, READY)
                    await anyio.sleep_forever()


async def _on_signals(signals: AsyncIterator[signal.Signals], life: _Lifecycle) -> None:
    """SIGTERM/SIGINT stop the daemon, SIGHUP reloads its config."""
    async for signum in signals:
        await _act(signum, life)


async def _follow_parent(channel: UNIXSocketStream, life: _Lifecycle) -> None:
    """A worker: ``reload`` and ``stop`` from its main process act as SIGHUP and SIGTERM;
    end-of-file (the main process is gone) stops it too."""
    async for line in lines(channel):
        if line == RELOAD:
            await _act(signal.SIGHUP, life, sent_by="main process")
        elif line == STOP:
            await _act(signal.SIGTERM, life, sent_by="main process")
    if not life.stopping:
        log.warning("worker.main_process_gone", extra={"action": "stopping"})
    await _act(signal.SIGTERM, life, sent_by="main process gone")


async def _act(signum: signal.Signals, life: _Lifecycle, *, sent_by: str | None = None) -> None:
    """Reload on SIGHUP (passing a valid config on to the workers); stop on anything else."""
    if signum == signal.SIGHUP:
        if life.daemon is None or life.stopping:
            log.warning(
                "config.reload_skipped",
                extra={"reason": "stopping" if life.stopping else "still starting"},
            )
            return
        systemd.notify("RELOADING=1", _monotonic_usec())
        if (
            await reload_config(life.daemon, life.config, load=life.load)
            and life.daemon.workers is not None
        ):
            await life.daemon.workers.reload()
        systemd.notify("READY=1", f"STATUS={_summary(life.daemon)}")
        return
    fields: dict[str, object] = {"signal": signum.name}
    if sent_by is not None:
        fields["sent_by"] = sent_by
    if life.waiting.waiting_for is not None:
        fields["waiting_for"] = life.waiting.waiting_for
    if life.stopping:
        fields["already_stopping"] = True
    log.info("daemon.signal", extra=fields)
    if not life.stopping:
        systemd.notify("STOPPING=1", "STATUS=stopping")
        life.stop()


def _summary(daemon: Daemon) -> str:
    roles = ",".join(role for role in ROLES if role in daemon.roles)
    workers = f", {daemon.workers.count} workers" if daemon.workers is not None else ""
    return f"running {len(daemon.settings.sources)} sources ({roles}{workers})"


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
