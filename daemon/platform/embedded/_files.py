"""The state directory's files: private from their creation, written atomically, locked.

The state directory is private: directories 0700, files 0600, made so at every start (an older
coleta left them readable). An exclusive lock per server keeps two daemons off one store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from daemon.errors import EmbeddedServerError

__all__ = [
    "DATABASE_URL_FILE",
    "NATS_URL_FILE",
    "PGDATA",
    "POLL_INTERVAL",
    "POSTGRES_STATE_DIR",
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "exclusive_lock",
    "open_log",
    "open_private",
    "postgres_user",
    "prepare_dir",
    "process_args",
    "read_pid",
    "read_url",
    "tail",
    "write_private",
    "write_url",
]

SECONDS = 1.0
MIB = 1024 * 1024
START_TIMEOUT = 10 * SECONDS
STOP_TIMEOUT = 5 * SECONDS
POLL_INTERVAL = 0.02 * SECONDS
LOG_ROTATE_SIZE = 10 * MIB

NATS_URL_FILE = "nats.url"
DATABASE_URL_FILE = "database.url"
PGSERVER_USER = "pgserver"  # the system user pgserver runs PostgreSQL as when we are root
PGDATA = "postgres"  # the data directory, in the state directory
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
POSTGRES_STATE_DIR = 0o710  # as root: PostgreSQL, run as pgserver's user, reaches its data dir


def write_private(path: Path, text: str) -> None:
    """Write atomically a file that only its owner may read (0600 from its creation)."""
    partial = path.with_name(path.name + ".tmp")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    partial.replace(path)


def postgres_user() -> pwd.struct_passwd | None:
    """The user pgserver runs PostgreSQL as, when it is not us (we are root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PGSERVER_USER)
    except KeyError:
        return None


def prepare_dir(path: Path) -> Path:
    """Create `path` private (0700), or make it so: an older coleta left it 0755.

    As root, a state directory holding PostgreSQL's data stays 0710: pg_ctl, run as
    pgserver's user, must reach it even while another process starts (``_confine_postgres``).
    """
    path = path.expanduser().resolve()
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    postgres_inside = postgres_user() is not None and (path / PGDATA).is_dir()
    wanted = POSTGRES_STATE_DIR if postgres_inside else PRIVATE_DIR
    if stat.S_IMODE(path.stat().st_mode) != wanted:
        path.chmod(wanted)
    return path


def open_private(path: Path, flags: int) -> int:
    """Open (or create) `path` for this user only, even if it was readable before."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return fd


@contextlib.contextmanager
def exclusive_lock(path: Path, *, server: str) -> Iterator[None]:
    """Hold an flock on `path` for a server's lifetime; released even if we are killed.

    The descriptor is not inheritable, so the server we spawn cannot keep it locked.
    """
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise EmbeddedServerError(
                f"{path.parent} is in use by another coleta process (lock {path})",
                server=server,
            ) from exc
        yield


def open_log(path: Path) -> IO[bytes]:
    """Append to the server log, keeping one previous generation once it grows large."""
    previous = path.with_name(path.name + ".1")
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_ROTATE_SIZE:
            path.replace(previous)
    with contextlib.suppress(FileNotFoundError):
        previous.chmod(PRIVATE_FILE)  # an older coleta's
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "ab")


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def write_url(path: Path, url: str) -> None:
    """Write atomically, so a CLI client never reads half a URL; for this user only."""
    partial = path.with_name(path.name + ".tmp")
    with os.fdopen(open_private(partial, os.O_WRONLY | os.O_TRUNC), "w") as file:
        file.write(url + "\n")
    partial.replace(path)


def read_url(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def process_args(pid: int) -> list[str] | None:
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
