"""Worker processes: ``coleta run --workers N`` uses the machine's cores without ``--role``.

N counts the processes that fetch and write: the main process starts them, each
``python -m daemon run --role fetcher,writer --worker-index I`` (I from 1) with the same
config file and environment, on the same NATS and PostgreSQL (with the embedded default, the
servers the main process started, which a worker finds in the state directory), and runs
its other roles itself: by default the ticker and the service. Measured on the fan-out
benchmark, a main process that also fetched was the bottleneck (it answers every trigger and
publishes every command): 2 and 4 processes so made 0.87x and 0.51x the runs per second of
one process, against 1.30x and 1.42x with 2 and 4 workers beside a main process that
fetches nothing. Consumers are
durable and shared, so work spreads over the processes as with ``--role`` splits, and leases
keep one run per source at a time.

Each worker's stdin is the channel (``_channel``): ``ready`` comes back once its stages have
started; ``reload`` passes a SIGHUP on (the worker reads the config file again, as this
process did); ``stop`` starts its graceful stop. If the main process dies, even by SIGKILL,
the worker reads end-of-file and stops gracefully. Workers run in their own session, like
the embedded servers: Ctrl-C in a terminal reaches the main process, which stops them.

A worker that exits while the daemon is not stopping is logged (``worker.exited``, error,
with its exit code) and started again after a backoff: 1 s, doubling up to 30 s, back to 1 s
once it has run for a minute; never a loop at full speed. What it writes to stderr (a
crash's traceback) becomes ``worker.stderr`` lines; its JSON log lines go to the same stdout
as the main process's, each with ``"worker": I``.

Stopping (``open_daemon``'s shutdown): ``stop`` asks every worker at once, so they drain
within their own ``shutdown_grace_s`` beside the main process; ``wait`` returns once all
have exited; one still running ``CLOSE_S`` past the grace is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import Process, TaskStatus, UNIXSocketStream
from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER
from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_PROMETHEUS_PORT

from contracts import ComponentHealth
from daemon.app._channel import READY, RELOAD, STOP, lines, send_line
from daemon.platform import prometheus
from daemon.platform.logs import get_logger
from daemon.platform.retry import Backoff

__all__ = [
    "CLOSE_S",
    "RESTART_BACKOFF",
    "STABLE_S",
    "WORKER_ROLES",
    "Workers",
    "worker_command",
    "worker_env",
]

log = get_logger("workers")

#: What a worker process runs (and its main process then does not).
WORKER_ROLES = frozenset({"fetcher", "writer"})
#: Waits before starting a worker that exited again.
RESTART_BACKOFF = Backoff(first_s=1.0, cap_s=30.0)
#: A worker that ran this long before it exited starts again after the first wait.
STABLE_S = 60.0
#: How long a worker may take past ``shutdown_grace_s`` to close before it is killed.
CLOSE_S = 5.0
#: The exit code reported for a worker that could not even be started (as a shell says).
_CANNOT_START = 127
#: Variables a worker must not inherit: systemd's notify socket and watchdog are the main
#: process's (``NotifyAccess=all`` would take a worker's READY=1 for the service's).
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def worker_env(env: Mapping[str, str], index: int) -> dict[str, str]:
    """Worker ``index``'s environment: the main process's, but where metrics are served for
    Prometheus (``OTEL_METRICS_EXPORTER`` names ``prometheus``), on the main process's port
    plus ``index``: each process has its own counters, and a port can be served by one only
    (the same port made every worker exit 2 and restart for ever). Port 0 stays 0 (any)."""
    out = dict(env)
    exporters = {name.strip().lower() for name in env.get(OTEL_METRICS_EXPORTER, "").split(",")}
    if "prometheus" in exporters:
        raw = env.get(OTEL_EXPORTER_PROMETHEUS_PORT, "").strip()
        port = int(raw) if raw.isdigit() else prometheus.DEFAULT_PORT
        if port:
            out[OTEL_EXPORTER_PROMETHEUS_PORT] = str(port + index)
    return out


def worker_command(config: str | None, workers: int | str, index: int) -> list[str]:
    """The command line of worker ``index``: this Python, this package, the same config."""
    command = [sys.executable, "-m", "daemon", "run", "--role", ",".join(sorted(WORKER_ROLES))]
    command += ["--workers", str(workers), "--worker-index", str(index)]
    if config is not None:
        command += ["--config", str(config)]
    return command


@dataclass(slots=True)
class _Worker:
    index: int
    process: Process | None = None
    channel: UNIXSocketStream | None = None
    #: Said ``ready`` since it was last started.
    ready: bool = False
    #: Set once it said ``ready`` or exited, the first time: start-up waits for it.
    settled: anyio.Event = field(default_factory=anyio.Event)
    #: Why it is not running, while it waits to be started again.
    down: str | None = None


class Workers:
    """Starts ``count`` worker processes, keeps them running, and stops them."""

    def __init__(
        self,
        count: int,
        command: Callable[[int], Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        backoff: Backoff = RESTART_BACKOFF,
        close_s: float = CLOSE_S,
    ) -> None:
        self._workers = [_Worker(index) for index in range(1, count + 1)]
        self._command = command
        base = os.environ if env is None else env
        self._env = {k: v for k, v in base.items() if k not in _NOT_INHERITED}
        self._backoff = backoff
        #: How long a worker may take to close once its time is up, before it is killed.
        self.close_s = close_s
        self._stopping = False
        #: Set by ``stop``: ends the waits before a restart.
        self._stopped = anyio.Event()
        self._done = anyio.Event()

    @property
    def count(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> dict[int, int]:
        """Each running worker's pid, by index."""
        return {w.index: w.process.pid for w in self._workers if w.process is not None}

    def health(self) -> ComponentHealth:
        """Ok while every worker runs and has said it is ready (``coleta health``)."""
        down = [f"worker {w.index} {w.down or 'starting'}" for w in self._workers if not w.ready]
        if down:
            return ComponentHealth(ok=False, detail="; ".join(down))
        return ComponentHealth(ok=True, detail=f"{self.count} running")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every worker and keep them running until ``stop``; started once each has
        said it is ready (or exited, to be started again in the background)."""
        try:
            async with anyio.create_task_group() as tg:
                for worker in self._workers:
                    tg.start_soon(self._keep, worker, name=f"worker-{worker.index}")
                for worker in self._workers:
                    await worker.settled.wait()
                log.info("workers.ready", extra={"workers": self.count, "pids": self.pids})
                task_status.started()
        finally:
            self._done.set()

    async def reload(self) -> None:
        """Pass a reload on: each worker reads its config again, as this process did."""
        for worker in self._workers:
            if worker.channel is not None:
                await send_line(worker.channel, RELOAD)

    async def stop(self) -> None:
        """Ask every worker to stop (gracefully, within its own ``shutdown_grace_s``), and
        start none again."""
        self._stopping = True
        self._stopped.set()
        with anyio.move_on_after(1.0):
            for worker in self._workers:
                if worker.channel is not None:
                    await send_line(worker.channel, STOP)

    async def wait(self) -> None:
        """Until every worker has exited after ``stop`` (or ``run`` was cancelled)."""
        await self._done.wait()

    async def _keep(self, worker: _Worker) -> None:
        failures = 0
        while not self._stopping:
            started = anyio.current_time()
            pid, code = await self._run_once(worker)
            worker.settled.set()
            if self._stopping:
                log.info("worker.stopped", extra=_exit_fields(worker.index, pid, code))
                return
            ran_s = anyio.current_time() - started
            failures = 1 if ran_s >= STABLE_S else failures + 1
            delay = self._backoff.delay(failures)
            worker.down = f"exited ({_describe(code)}), restarting"
            log.error(
                "worker.exited",
                extra={
                    **_exit_fields(worker.index, pid, code),
                    "ran_s": round(ran_s, 1),
                    "restart_in_s": delay,
                },
            )
            with anyio.move_on_after(delay):
                await self._stopped.wait()

    async def _run_once(self, worker: _Worker) -> tuple[int, int]:
        """Run the worker until it exits; its pid and exit code. Cancelled, it is asked to
        stop and killed ``CLOSE_S`` later if still running."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs, anyio.CancelScope(shield=True):
            # Shielded: a worker spawned while we were cancelled must still be reaped below.
            try:
                process = await anyio.open_process(
                    list(self._command(worker.index)),
                    stdin=theirs.fileno(),
                    stdout=None,  # the same stdout: its JSON lines beside ours
                    stderr=subprocess.PIPE,
                    env=worker_env(self._env, worker.index),
                    start_new_session=True,
                )
            except OSError as exc:
                log.error("worker.start_failed", extra={"worker": worker.index, "error": str(exc)})
                return 0, _CANNOT_START
            channel = await UNIXSocketStream.from_socket(ours.detach())
        worker.process, worker.channel, worker.down = process, channel, None
        log.info("worker.started", extra={"worker": worker.index, "pid": process.pid})
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen, worker, channel, name=f"worker-{worker.index}-channel")
                # Until its stderr closes, at its exit: a crash's last words are all logged.
                await self._relay_stderr(worker, process)
                await process.wait()
                tg.cancel_scope.cancel()
        finally:
            worker.ready, worker.channel = False, None
            with anyio.CancelScope(shield=True):
                await _end(process, channel, asked=self._stopping, close_s=self.close_s)
            worker.process = None
        code = process.returncode
        return process.pid, code if code is not None else -signal.SIGKILL

    async def _listen(self, worker: _Worker, channel: UNIXSocketStream) -> None:
        async for line in lines(channel):
            if line == READY:
                worker.ready = True
                worker.settled.set()

    @staticmethod
    async def _relay_stderr(worker: _Worker, process: Process) -> None:
        if process.stderr is None:
            return
        async for line in lines(process.stderr):
            if line.strip():
                log.warning(
                    "worker.stderr",
                    extra={"worker": worker.index, "pid": process.pid, "text": line},
                )


async def _end(process: Process, channel: UNIXSocketStream, *, asked: bool, close_s: float) -> None:
    """Reap a worker: one still running is asked to stop and killed ``close_s`` later, or
    killed at once when it was ``asked`` already (its time is up)."""
    if process.returncode is None and not asked:
        await send_line(channel, STOP)
        with anyio.move_on_after(close_s):
            await process.wait()
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    await channel.aclose()
    await process.aclose()


def _exit_fields(index: int, pid: int, code: int) -> dict[str, object]:
    fields: dict[str, object] = {"worker": index, "pid": pid, "exit_code": code}
    if code < 0:
        with contextlib.suppress(ValueError):
            fields["signal"] = signal.Signals(-code).name
    return fields


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit code {code}"
