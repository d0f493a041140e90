"""The embedded PostgreSQL (pgserver), listening only on a private Unix socket.

Its data directory is ``<state_dir>/postgres`` (its log is ``postgres/log``). It listens only
on a Unix socket inside the state directory (or, when that path is too long for a socket, in a
short per-user runtime directory chosen by pgserver), so it cannot collide with a system one.
PostgreSQL trusts whoever reaches its socket as its superuser, so the socket and its directory
are the owner's only.

As root, pgserver runs PostgreSQL (and pg_ctl) as its own ``pgserver`` user, keeping our group
(root), and at every start opens each directory above the data directory to everyone (read and
search) and a socket directory outside it to everyone's writes. ``_confine_postgres`` closes
them again: the state directory becomes 0710, searchable by its group, which that user's
processes run with, so pg_ctl still reaches the data directory; the directories above it get
their modes back, plus search; the socket directory belongs to that user, 0700.

Whoever holds the lock forgets the PostgreSQL handles of dead processes (pgserver stops its
server only when the last handle closes).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from daemon.errors import EmbeddedServerError
from daemon.platform.embedded._files import (
    DATABASE_URL_FILE,
    PGDATA,
    POSTGRES_STATE_DIR,
    PRIVATE_DIR,
    PRIVATE_FILE,
    exclusive_lock,
    postgres_user,
    prepare_dir,
    process_args,
    tail,
    write_url,
)

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = ["embedded_postgres"]

PGSERVER_HANDLES = ".handle_pids.json"  # pgserver's list of processes holding the server


@contextlib.asynccontextmanager
async def embedded_postgres(state_dir: Path) -> AsyncIterator[str]:
    """Run PostgreSQL (pgserver) on `state_dir`/postgres; yield a Unix-socket conninfo URL."""
    state_dir = prepare_dir(state_dir)
    pgdata = state_dir / PGDATA
    url_file = state_dir / DATABASE_URL_FILE
    with warnings.catch_warnings():
        # pgserver resolves its runtime dir (lock file, short socket dirs) at import, and
        # platformdirs warns when XDG_RUNTIME_DIR is unset, which is normal for a daemon.
        warnings.simplefilter("ignore", UserWarning)
        import pgserver  # noqa: F401  (imported here for the side effect above)
    with exclusive_lock(state_dir / "postgres.lock", server="postgresql"):
        # Shielded: a server started while we were cancelled must still reach cleanup below.
        with anyio.CancelScope(shield=True):
            server = await anyio.to_thread.run_sync(_start_postgres, pgdata)
        try:
            url = server.get_uri()
            write_url(url_file, url)
            yield url
        finally:
            with anyio.CancelScope(shield=True):
                url_file.unlink(missing_ok=True)
                await anyio.to_thread.run_sync(server.cleanup)


def _start_postgres(pgdata: Path) -> PostgresServer:
    """initdb on first use, start or reuse the server; blocking, so run in a thread."""
    from pgserver.postgres_server import PostgresServer, get_server

    log = pgdata / "log"
    above = {directory: directory.stat().st_mode for directory in pgdata.parent.parents}
    try:
        _forget_dead_handles(PostgresServer, pgdata)
        server = get_server(pgdata, cleanup_mode="stop")
    except (OSError, subprocess.SubprocessError, RuntimeError, AssertionError) as exc:
        raise EmbeddedServerError(
            f"PostgreSQL failed to start in {pgdata}: {exc}; log {log}:\n{tail(log)}",
            server="postgresql",
            log=log,
        ) from exc
    _confine_postgres(server, pgdata, above)
    return server


def _confine_postgres(server: PostgresServer, pgdata: Path, above: dict[Path, int]) -> None:
    """Let no other local user reach the server's socket or the state directory.

    The socket becomes the owner's only now and, from the next start on, from its creation
    (``unix_socket_permissions``). As root, what pgserver opened (see the module docstring)
    is closed again: ``above`` holds the modes of the directories above the state directory
    before it started. A failure stops the server: it must not run reachable.
    """
    # Here, not at the top: the CLI's commands import this package (read_state_urls) and need
    # no PostgreSQL client.
    import psycopg

    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET unix_socket_permissions = '0700'")
        info = server.get_postmaster_info()
        postgres = postgres_user()
        if info.socket_dir is not None and info.socket_dir != pgdata:
            if postgres is not None:
                os.chown(info.socket_dir, postgres.pw_uid, postgres.pw_gid)
            info.socket_dir.chmod(PRIVATE_DIR)
        if info.socket_path is not None:
            info.socket_path.chmod(PRIVATE_DIR)
        (pgdata / PGSERVER_HANDLES).chmod(PRIVATE_FILE)
        if postgres is not None:
            _reopen_to_postgres_only(pgdata.parent, above)
    except (OSError, psycopg.Error) as exc:
        server.cleanup()
        raise EmbeddedServerError(
            f"could not make the PostgreSQL in {pgdata} private: {exc}", server="postgresql"
        ) from exc


def _reopen_to_postgres_only(state_dir: Path, above: dict[Path, int]) -> None:
    """As root: the state directory searchable by its group (PostgreSQL's processes run with
    ours), not by others; each directory above it that pgserver opened back to its mode
    before, plus the search PostgreSQL's user needs (by group or as another user)."""
    state_dir.chmod(POSTGRES_STATE_DIR)
    for directory, before in above.items():
        if directory.stat().st_mode != before:
            directory.chmod(stat.S_IMODE(before) | stat.S_IXGRP | stat.S_IXOTH)


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
        alive = [pid for pid in pids if isinstance(pid, int) and process_args(pid) is not None]
        if alive != pids:
            handles.write_text(json.dumps(alive))
