"""Servers, namespaces and processes for the benchmarks.

Services are picked like the tests pick theirs: ``COLETA_BENCH_NATS_URL`` /
``COLETA_BENCH_DATABASE_URL``; else the machine's NATS (127.0.0.1:4222) and PostgreSQL
(``postgresql://postgres@127.0.0.1:5432/test``) when they answer; else the embedded servers of
``daemon.platform.embedded``. Every measured run gets its own bus prefix and database schema,
removed afterwards.

The daemon runs as a subprocess (``python -m daemon run --config FILE``), as in production: the
benchmark's own work (triggering, polling) never shares its event loop or GIL, and its CPU time
and peak RSS (``VmHWM``) are read from ``/proc/<pid>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import psycopg
from anyio.abc import Process
from nats.aio.client import Client
from psycopg import sql

__all__ = [
    "Daemon",
    "MockAPI",
    "Namespace",
    "Services",
    "cpu_seconds",
    "find_pids",
    "mock_api",
    "namespace",
    "open_services",
    "proc_status_kib",
    "running_daemon",
    "to_toml",
]

NATS_ENV = "COLETA_BENCH_NATS_URL"
DATABASE_ENV = "COLETA_BENCH_DATABASE_URL"
MACHINE_NATS = "nats://127.0.0.1:4222"
MACHINE_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
#: Clock ticks per second, for /proc/<pid>/stat CPU times.
_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 120.0


# --- services ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Services:
    nats_url: str
    database_url: str
    #: Where each came from: "env", "machine" or "embedded".
    nats_from: str
    database_from: str


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _pg_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@contextlib.asynccontextmanager
async def open_services(state_dir: Path) -> AsyncIterator[Services]:
    """The NATS and PostgreSQL to measure against (embedded ones stop on exit)."""
    from daemon.platform.embedded import embedded_nats, embedded_postgres

    async with contextlib.AsyncExitStack() as stack:
        if url := os.environ.get(NATS_ENV):
            nats_url, nats_from = url, "env"
        elif _tcp_open("127.0.0.1", 4222):
            nats_url, nats_from = MACHINE_NATS, "machine"
        else:
            server = await stack.enter_async_context(embedded_nats(state_dir / "nats"))
            nats_url = server.url_with_password  # it accepts only its own user
            nats_from = "embedded"
        if url := os.environ.get(DATABASE_ENV):
            database_url, database_from = url, "env"
        elif _tcp_open("127.0.0.1", 5432) and _pg_answers(MACHINE_DATABASE):
            database_url, database_from = MACHINE_DATABASE, "machine"
        else:
            database_url = await stack.enter_async_context(embedded_postgres(state_dir / "pg"))
            database_from = "embedded"
        yield Services(nats_url, database_url, nats_from, database_from)


# --- per-run namespaces -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Namespace:
    """A bus prefix and a database schema of one measured run."""

    prefix: str
    schema: str
    services: Services

    def connect(self) -> psycopg.Connection[Any]:
        """An autocommit connection with ``search_path`` set to the run's schema."""
        conn = psycopg.connect(self.services.database_url, autocommit=True)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    async def aconnect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self.services.database_url, autocommit=True)
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    async def nats(self) -> Client:
        return await nats.connect(self.services.nats_url, connect_timeout=5)


@contextlib.asynccontextmanager
async def namespace(services: Services, tag: str) -> AsyncIterator[Namespace]:
    """A fresh prefix and schema; the streams, buckets and schema are removed afterwards."""
    token = secrets.token_hex(3)
    ns = Namespace(prefix=f"b{tag}{token}", schema=f"b{tag}{token}", services=services)
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(ns.schema)))
    try:
        yield ns
    finally:
        with anyio.CancelScope(shield=True):
            await _delete_streams(services.nats_url, ns.prefix)
            with psycopg.connect(services.database_url, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '30s'")
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(ns.schema)))


async def _delete_streams(url: str, prefix: str) -> None:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        names: list[str] = []
        while page := await js.streams_info(offset=len(names)):
            names.extend(info.config.name or "" for info in page)
        for name in names:
            bare = name.removeprefix("KV_").removeprefix("OBJ_")
            if bare.lower().startswith(prefix):
                await js.delete_stream(name)
    finally:
        await nc.close()


# --- the mock API ---------------------------------------------------------------------------------


@dataclass(slots=True)
class MockAPI:
    port: int
    pid: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, float]:
        """Requests served and CPU seconds used so far."""
        import httpx

        reply = httpx.get(self.url("/stats"), timeout=5)
        return dict(msgspec.json.decode(reply.content))


@contextlib.contextmanager
def mock_api() -> Iterator[MockAPI]:
    """The mock API in its own process; it stops when we close its stdin."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.mock_api"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"mock API did not start: {line!r}")
        yield MockAPI(port=int(line.split()[1]), pid=process.pid)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=5)


# --- the daemon as a subprocess ----------------------------------------------------------------


def to_toml(data: Mapping[str, Any]) -> str:
    """Just enough TOML for a coleta config: scalars, inline tables, ``[[sources]]``."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, Mapping):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = [f"{k} = {value(v)}" for k, v in data.items() if k != "sources"]
    for source in data.get("sources", []):
        lines += ["", "[[sources]]", *(f"{k} = {value(v)}" for k, v in source.items())]
    return "\n".join(lines) + "\n"


@dataclass(slots=True)
class Daemon:
    """A running ``python -m daemon run`` and its log."""

    process: Process
    log: Path
    config: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pids(self) -> list[int]:
        """The main process and the worker processes it started (``--workers``)."""
        found = [self.pid]
        for event in self.log_events("workers.ready"):
            found += [int(pid) for pid in event.get("pids", {}).values()]
        return found

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids)

    def peak_rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024

    def log_events(self, event: str) -> list[dict[str, Any]]:
        found = []
        with self.log.open("rb") as f:
            for line in f:
                if f'"{event}"'.encode() in line:
                    with contextlib.suppress(msgspec.DecodeError):
                        found.append(msgspec.json.decode(line))
        return found


def daemon_settings(
    ns: Namespace, sources: Sequence[Mapping[str, Any]], **extra: Any
) -> dict[str, Any]:
    """A config for the daemon bound to ``ns``."""
    return {
        "nats_url": ns.services.nats_url,
        "database_url": ns.services.database_url,
        "bus_prefix": ns.prefix,
        "database_schema": ns.schema,
        "shutdown_grace_s": 5,
        **extra,
        "sources": list(sources),
    }


@contextlib.asynccontextmanager
async def running_daemon(
    config: Mapping[str, Any],
    *,
    roles: str | None = None,
    wrap: Sequence[str] = (),
    workers: int | None = None,
) -> AsyncIterator[Daemon]:
    """Start the daemon on ``config`` and wait for ``daemon.ready``; SIGTERM it on exit.

    ``wrap`` goes before ``-m daemon`` (``["-m", "cProfile", "-o", "out.prof"]``);
    ``workers`` is ``coleta run --workers`` (the daemon is ready once its workers are).
    """
    workdir = Path(tempfile.mkdtemp(prefix="coleta-bench-"))
    config_path = workdir / "coleta.toml"
    config_path.write_text(to_toml({**config, "state_dir": str(workdir / "state")}))
    log_path = workdir / "daemon.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "COLETA_")) and k not in ("NATS_URL", "DATABASE_URL")
    }
    command = [sys.executable, *wrap, "-m", "daemon", "run", "--config", str(config_path)]
    if roles:
        command += ["--role", roles]
    if workers is not None:
        command += ["--workers", str(workers)]
    with log_path.open("wb") as log_file:
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    daemon = Daemon(process, log_path, config_path)
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            # Polling the log: the daemon says nothing else to us when it is ready.
            while not _main_ready(log_path):
                if process.returncode is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"daemon exited with {process.returncode}:\n{tail}")
                await anyio.sleep(0.05)
        yield daemon
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(30):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        await process.aclose()
        if process.returncode not in (0, -signal.SIGKILL):
            tail = log_path.read_text(errors="replace")[-2000:]
            print(f"warning: daemon exited with {process.returncode}:\n{tail}", file=sys.stderr)


def _main_ready(path: Path) -> bool:
    """The main process said ``daemon.ready`` (a worker's line, tagged ``worker``, does not
    count: the main process is ready once its workers are)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return False
    lines = text.splitlines()
    return any(b'"daemon.ready"' in line and b'"worker":' not in line for line in lines)


# --- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmHWM, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def find_pids(*names: str) -> list[int]:
    """Processes whose command name is one of ``names`` (``nats-server``, ``postgres``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(int(entry.name))
    return found


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle, summed over cores, since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(x) for x in fields]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _TICKS


@dataclass(slots=True)
class CpuMeter:
    """CPU seconds used between ``start`` and ``stop`` by named groups of processes."""

    groups: dict[str, list[int]]
    _start: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _machine: float = 0.0
    wall_s: float = 0.0

    _per_pid: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._per_pid = {pid: cpu_seconds([pid]) for pids in self.groups.values() for pid in pids}
        self._machine = machine_busy_seconds()

    def stop(self) -> None:
        """A process gone in between counts nothing (its CPU time is lost with it)."""
        self.wall_s = time.monotonic() - self._t0
        self.used = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                now = cpu_seconds([pid])
                if now > 0:
                    total += now - self._per_pid.get(pid, 0.0)
            self.used[name] = total
        self.used["machine"] = machine_busy_seconds() - self._machine
