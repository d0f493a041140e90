"""Servers a test may break on purpose, and the daemon as a process it may kill.

``private_nats`` is a nats-server of this test alone, on a fixed port and JetStream store, so
it can be stopped and started again where clients expect it. ``private_postgres`` is a
PostgreSQL 16 (pgserver's binaries) of this test alone, stopped and started with ``pg_ctl``
on the same data directory and socket. ``daemon_processes`` starts ``python -m daemon run``
as a child process that a test may SIGKILL, and reads its JSON log lines back.

Everything here is observable state (a process, a port answering, a log line, a row), so the
tests wait on conditions rather than sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgspec
import nats
import psycopg
import pytest
from nats.aio.msg import Msg

from tests.fix_pg import server_state_dir

T = TypeVar("T")

NATS_SERVER = Path(sys.executable).parent / "nats-server"
START_TIMEOUT_S = 15.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(
    get: Callable[[], Awaitable[T]],
    *,
    until: Callable[[T], object] = bool,
    within_s: float = 15.0,
    what: str = "",
) -> T:
    """Await ``get()`` until ``until`` holds for its value, and return that value.

    The async twin of ``tests.fix_daemon.wait_for``: checks that talk to a server must not
    block the event loop an in-process daemon runs on. Fails with ``what`` after ``within_s``.
    """
    last: T | None = None
    with anyio.move_on_after(within_s):
        while True:
            last = await get()
            if until(last):
                return last
            await anyio.sleep(0.05)
    raise AssertionError(f"timed out after {within_s} s waiting for {what or get}: last={last!r}")


# --- nats-server ----------------------------------------------------------------------------


@dataclass
class NatsServer:
    """A nats-server with JetStream on disk that a test can stop and start again."""

    port: int
    store_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self._start)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        await anyio.to_thread.run_sync(self._stop, sig)

    def _start(self) -> None:
        assert self.process is None, "already running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(NATS_SERVER),
                    *("-a", "127.0.0.1", "-p", str(self.port)),
                    *("-js", "-sd", str(self.store_dir)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nats-server exited:\n{self.log.read_text()[-2000:]}")
            if _greets(self.port):
                return
            time.sleep(0.02)
        raise AssertionError(f"nats-server not up in {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def _stop(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _greets(port: int) -> bool:
    """True once a client connecting to ``port`` receives the server's INFO line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test alone (port and store kept across restarts)."""
    server = NatsServer(
        port=free_port(), store_dir=tmp_path / "jetstream", log=tmp_path / "nats.log"
    )
    server._start()
    try:
        yield server
    finally:
        server._stop(signal.SIGKILL)


# --- PostgreSQL -----------------------------------------------------------------------------


@dataclass
class PostgresServer:
    """A PostgreSQL 16 data directory served on a Unix socket, stopped and started with pg_ctl.

    The first start (initdb, the ``pgserver`` system user when running as root, permissions)
    is pgserver's; later ones run the same ``pg_ctl start`` on the same socket directory, so
    the URL stays valid across restarts.
    """

    pgdata: Path
    url: str = ""
    socket_dir: Path | None = None
    system_user: str | None = None
    running: bool = False
    _handle: Any = field(default=None, repr=False)

    def _first_start(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # platformdirs: XDG_RUNTIME_DIR unset
            from pgserver.postgres_server import get_server

        # cleanup_mode=None: we stop the server ourselves, pgserver must not also try.
        self._handle = get_server(self.pgdata, cleanup_mode=None)
        info = self._handle.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.system_user = self._handle.system_user
        self.url = str(self._handle.get_uri())
        self.running = True

    def _pg_ctl(self, *args: str) -> None:
        """pgserver's ``pg_ctl``, run as the user that owns the data directory."""
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), *args],
            user=self.system_user,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )

    async def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: open sessions are terminated, new ones refused."""
        await anyio.to_thread.run_sync(self._stop, mode)

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self._start)

    def _stop(self, mode: str = "fast") -> None:
        if self.running:
            self._pg_ctl("-w", "-m", mode, "stop")
            self.running = False

    def _start(self) -> None:
        assert not self.running, "already running"
        self._pg_ctl(
            "-w",
            *("-o", '-h ""', "-o", f"-k {self.socket_dir}"),
            *("-l", str(self.pgdata / "log")),
            "start",
        )
        self.running = True

    def _cleanup(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._stop("immediate")
        if self._handle is not None:
            self._handle.cleanup()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test alone, which it may stop and start."""
    with server_state_dir("fault-pg") as state_dir:
        server = PostgresServer(pgdata=state_dir / "pgdata")
        server._first_start()
        try:
            yield server
        finally:
            server._cleanup()


# --- the daemon as a process ----------------------------------------------------------------


@dataclass
class DaemonProcess:
    """``python -m daemon run`` with a config file, its JSON log lines in ``log``."""

    name: str
    config: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (of every start), or only those of event ``name``."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    async def wait_ready(self, within_s: float = 30.0) -> None:
        """Until this start of the daemon has logged ``daemon.ready``."""

        async def ready() -> bool:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise AssertionError(f"{self.name} exited ({code}):\n{self.tail()}")
            return len(self.events("daemon.ready")) >= self.starts

        await eventually(ready, within_s=within_s, what=f"{self.name} ready")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` and reap the process; returns its exit code."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"{self.name} ignored {sig.name}:\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def daemon_processes(tmp_path: Path, bus_prefix: str) -> Iterator[DaemonFactory]:
    """``spawn(name, config_text, **env)`` → a DaemonProcess, not started; stopped afterwards.

    Stopped before ``bus_prefix`` deletes the test's streams, which a daemon still running
    would declare again.
    """
    spawned: list[DaemonProcess] = []

    def spawn(name: str, config: str, **env: str) -> DaemonProcess:
        path = tmp_path / f"{name}.toml"
        path.write_text(config)
        clean = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NATS_URL", "DATABASE_URL", "COLETA_CONFIG", "EXTERNAL_API_URL")
            and not k.startswith(("OTEL_", "COLETA_"))
        }
        daemon = DaemonProcess(name, path, clean | env, tmp_path / f"{name}.log")
        spawned.append(daemon)
        return daemon

    yield spawn
    for daemon in spawned:
        if daemon.process is not None and daemon.process.poll() is None:
            # SIGTERM first: a daemon running embedded servers stops them on its way out.
            daemon.process.terminate()
            try:
                daemon.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()


# --- talking to the daemon and its database -------------------------------------------------


async def request(url: str, subject: str, body: bytes | dict[str, Any] = b"") -> Msg:
    """One request to ``subject`` on the NATS server at ``url``."""
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        return await nc.request(subject, data, timeout=10)
    finally:
        await nc.close()


async def request_json(url: str, subject: str, body: bytes | dict[str, Any] = b"") -> Any:
    reply = await request(url, subject, body)
    assert not (reply.headers or {}).get("Nats-Service-Error"), reply.headers
    return msgspec.json.decode(reply.data)


@contextlib.asynccontextmanager
async def connect_db(url: str, schema: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to ``schema`` of the database at ``url``."""
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, options=f"-c search_path={schema}", connect_timeout=5
    ) as conn:
        yield conn


@dataclass(frozen=True)
class Runs:
    """What PostgreSQL holds about a set of runs."""

    status: dict[str, str]  # run_id → status
    attempts: dict[str, int]  # run_id → attempts
    rows: dict[str, int]  # run_id → rows in collected_data
    total_rows: int

    def stored(self) -> set[str]:
        return {run for run, status in self.status.items() if status == "stored"}


async def read_runs(url: str, schema: str) -> Runs:
    async with connect_db(url, schema) as conn:
        cur = await conn.execute("SELECT run_id, status, attempts FROM collection_runs")
        run_rows = await cur.fetchall()
        data = await conn.execute("SELECT run_id, count(*) FROM collected_data GROUP BY run_id")
        per_run = {str(run_id): int(n) for run_id, n in await data.fetchall()}
    return Runs(
        status={str(r[0]): str(r[1]) for r in run_rows},
        attempts={str(r[0]): int(r[2]) for r in run_rows},
        rows=per_run,
        total_rows=sum(per_run.values()),
    )


async def read_runs_or_none(url: str, schema: str) -> Runs | None:
    """Like ``read_runs``, but None while the database does not answer."""
    try:
        return await read_runs(url, schema)
    except psycopg.OperationalError:
        return None


async def wait_runs(
    url: str, schema: str, until: Callable[[Runs], bool], *, within_s: float = 20.0, what: str = ""
) -> Runs:
    """Poll the runs in PostgreSQL (which may be down for a while) until ``until`` holds."""
    runs = await eventually(
        lambda: read_runs_or_none(url, schema),
        until=lambda runs: runs is not None and until(runs),
        within_s=within_s,
        what=what,
    )
    assert runs is not None
    return runs
