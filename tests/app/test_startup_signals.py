"""Signals during start-up, and a daemon that cannot reach its servers.

The daemon runs as a child process (``coleta run``) and gets real signals while it waits for
something at start: a NATS or PostgreSQL that does not answer, the migrations lock held by
another process, its embedded servers. Each time it must stop within its shutdown budget,
exit 0, and say in its ``daemon.signal`` line what it was waiting for. A server that stays
unreachable past ``connect_timeout_s`` is one error line naming it, and exit code 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import psycopg
import pytest

from daemon.errors import EXIT_UNREACHABLE
from daemon.platform import phase
from daemon.platform.bus._connect import connect_nats
from tests._proc import alive
from tests.fix_faults import DaemonFactory, DaemonProcess, eventually, free_port
from tests.fix_pg import server_state_dir

pytestmark = pytest.mark.anyio

#: ``shutdown_grace_s`` of every daemon here; the budget to stop is this plus a few seconds.
GRACE_S = 1.0
BUDGET_S = GRACE_S + 5.0


def config(**top: str | float) -> str:
    """A config file with one source that is never due and the given top-level keys."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in top.items()]
    lines += [
        f"shutdown_grace_s = {GRACE_S}",
        "[[sources]]",
        'name = "never"',
        'url = "http://127.0.0.1:9/never"',
        'schedule = "0 0 1 1 *"',
    ]
    return "\n".join(lines) + "\n"


async def logged(daemon: DaemonProcess, needle: str, *, within_s: float = 30.0) -> None:
    """Until a log line of the running daemon contains ``needle``."""

    async def seen() -> bool:
        assert daemon.process is not None
        if daemon.process.poll() is not None:
            raise AssertionError(
                f"{daemon.name} exited ({daemon.process.returncode}):\n{daemon.tail()}"
            )
        return needle in daemon.log.read_text(errors="replace")

    await eventually(seen, within_s=within_s, what=f"{needle!r} in the log of {daemon.name}")


async def stop(daemon: DaemonProcess, sig: signal.Signals) -> tuple[int, float]:
    """Send ``sig``; the exit code and how long the daemon took to exit (it is killed after
    twice the budget, and the test fails)."""
    assert daemon.process is not None
    process = daemon.process
    started = time.monotonic()
    process.send_signal(sig)
    try:
        code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=2 * BUDGET_S))
    except subprocess.TimeoutExpired:
        process.kill()
        await anyio.to_thread.run_sync(process.wait)
        raise AssertionError(
            f"{daemon.name} still running {2 * BUDGET_S:g} s after {sig.name}:\n{daemon.tail()}"
        ) from None
    return code, time.monotonic() - started


def signal_line(daemon: DaemonProcess) -> dict[str, Any]:
    (line,) = daemon.events("daemon.signal")
    return line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
async def test_a_signal_while_nats_is_unreachable_stops_at_once(
    daemon_processes: DaemonFactory, database_url: str, db_schema: str, sig: signal.Signals
) -> None:
    port = free_port()  # nothing listens there
    url = f"nats://127.0.0.1:{port}"
    daemon = daemon_processes(
        "no-nats", config(nats_url=url, database_url=database_url, database_schema=db_schema)
    )
    daemon.start()
    # A refused connection logged: the daemon is retrying NATS.
    await logged(daemon, f"Connect call failed ('127.0.0.1', {port})")

    code, took = await stop(daemon, sig)

    assert code == 0, daemon.tail()
    assert took < BUDGET_S, f"{sig.name} took {took:.1f} s to stop the daemon"
    line = signal_line(daemon)
    assert line["signal"] == sig.name
    assert line["waiting_for"].startswith(f"NATS at {url} (connect retry "), line
    assert daemon.events("daemon.stopped")
    assert "Traceback" not in daemon.tail(200)


async def test_sigterm_while_postgresql_is_unreachable_stops_at_once(
    daemon_processes: DaemonFactory, nats_url: str, bus_prefix: str
) -> None:
    url = f"postgresql://127.0.0.1:{free_port()}/test"
    daemon = daemon_processes(
        "no-postgres", config(nats_url=nats_url, database_url=url, bus_prefix=bus_prefix)
    )
    daemon.start()
    await logged(daemon, '"event":"db.connect_retry"')

    code, took = await stop(daemon, signal.SIGTERM)

    assert code == 0, daemon.tail()
    assert took < BUDGET_S, f"SIGTERM took {took:.1f} s to stop the daemon"
    assert signal_line(daemon)["waiting_for"].startswith(f"PostgreSQL at {url} (connect retry ")
    assert daemon.events("daemon.stopped")


@contextlib.asynccontextmanager
async def migrations_lock(url: str, schema: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """Hold the lock ``coleta migrate`` takes for ``schema``, as another process would."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"coleta.migrate.{schema}",))
        yield conn


async def blocked_by(conn: psycopg.AsyncConnection[Any]) -> int:
    """How many sessions wait for a lock ``conn`` holds."""
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_sigterm_while_migrations_wait_for_their_lock_stops_at_once(
    daemon_processes: DaemonFactory,
    nats_url: str,
    bus_prefix: str,
    database_url: str,
    db_schema: str,
) -> None:
    daemon = daemon_processes(
        "migrations-locked",
        config(
            nats_url=nats_url,
            database_url=database_url,
            bus_prefix=bus_prefix,
            database_schema=db_schema,
        ),
    )
    async with migrations_lock(database_url, db_schema) as holder:
        daemon.start()
        await eventually(lambda: blocked_by(holder), what="the daemon waiting for the lock")

        code, took = await stop(daemon, signal.SIGTERM)

        assert code == 0, daemon.tail()
        assert took < BUDGET_S, f"SIGTERM took {took:.1f} s to stop the daemon"
        waiting_for = signal_line(daemon)["waiting_for"]
        assert "migrations" in waiting_for, waiting_for
        assert db_schema in waiting_for, waiting_for
        # Its statement was cancelled in the server: no session is left waiting for the lock.
        assert await blocked_by(holder) == 0


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Not pytest's tmp_path: see tests/fix_pg.py on pgserver and /tmp/pytest-of-root."""
    with server_state_dir("signals") as path:
        yield path.resolve()


async def test_sigterm_during_embedded_start_up_stops_the_embedded_servers(
    daemon_processes: DaemonFactory, state_dir: Path
) -> None:
    # The embedded PostgreSQL, started first by "another process" (this test) on the daemon's
    # state directory, which holds the migrations lock: the daemon starts its nats-server,
    # shares this PostgreSQL, then waits for the lock.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # platformdirs: XDG_RUNTIME_DIR unset
        from pgserver.postgres_server import get_server

    server = await anyio.to_thread.run_sync(get_server, state_dir / "postgres", "stop")
    try:
        async with migrations_lock(str(server.get_uri()), "public") as holder:
            daemon = daemon_processes("embedded", config(state_dir=str(state_dir)))
            daemon.start()
            await eventually(lambda: blocked_by(holder), what="the daemon waiting for the lock")
            nats_pid = int((state_dir / "nats" / "nats-server.pid").read_text())
            assert alive(nats_pid)

            code, took = await stop(daemon, signal.SIGTERM)

            assert code == 0, daemon.tail()
            assert took < BUDGET_S, f"SIGTERM took {took:.1f} s to stop the daemon"
            assert "migrations" in signal_line(daemon)["waiting_for"]
            assert not alive(nats_pid)
            assert not (state_dir / "nats.url").exists()
            assert not (state_dir / "database.url").exists()
            handles = json.loads((state_dir / "postgres" / ".handle_pids.json").read_text())
            assert daemon.process is not None
            assert daemon.process.pid not in handles
    finally:
        await anyio.to_thread.run_sync(server.cleanup)


@pytest.mark.parametrize("server", ["NATS", "PostgreSQL"])
async def test_an_unreachable_server_is_one_error_line_and_exit_3(
    daemon_processes: DaemonFactory,
    nats_url: str,
    bus_prefix: str,
    database_url: str,
    db_schema: str,
    server: str,
) -> None:
    port = free_port()
    if server == "NATS":
        urls = {"nats_url": f"nats://127.0.0.1:{port}", "database_url": database_url}
    else:
        urls = {
            "nats_url": nats_url,
            "database_url": f"postgresql://postgres@127.0.0.1:{port}/test",
        }
    daemon = daemon_processes(
        f"unreachable-{server}",
        config(**urls, bus_prefix=bus_prefix, database_schema=db_schema, connect_timeout_s=2),
    )
    started = time.monotonic()
    daemon.start()
    assert daemon.process is not None
    process = daemon.process
    code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
    took = time.monotonic() - started

    assert code == EXIT_UNREACHABLE, daemon.tail()
    assert took < 2 + 8, f"gave up after {took:.1f} s with connect_timeout_s = 2"
    errors = [event for event in daemon.events() if event.get("level") == "error"]
    assert len(errors) == 1, daemon.tail()
    message = errors[0]["error"]
    assert message.startswith(f"cannot reach {server} at "), message
    assert f"127.0.0.1:{port}" in message
    assert "refused" in message.lower() or "connect call failed" in message.lower(), message
    assert "Traceback" not in daemon.tail(200)


async def test_a_cancelled_nats_connect_leaves_no_connection_or_task_behind() -> None:
    """A NATS that accepts the connection but never greets: the start-up waits, a signal
    cancels it, and the server sees the connection closed; nats-py keeps no task running."""
    greeted_nobody = anyio.Event()
    closed = anyio.Event()

    async def silent_server(stream: anyio.abc.SocketStream) -> None:
        greeted_nobody.set()
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while await stream.receive():
                    pass
            closed.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as servers:
        servers.start_soon(listener.serve, silent_server)
        await anyio.wait_all_tasks_blocked()  # the server waits for its client
        tasks_before = asyncio.all_tasks()
        with phase.watching() as waiting, anyio.CancelScope() as startup:
            async with anyio.create_task_group() as tg:
                tg.start_soon(connect_nats, f"nats://127.0.0.1:{port}", 60.0)
                await greeted_nobody.wait()
                startup.cancel()

        with anyio.fail_after(5):
            await closed.wait()
        assert asyncio.all_tasks() - tasks_before == set()
        assert waiting.waiting_for == f"NATS at nats://127.0.0.1:{port}"
        servers.cancel_scope.cancel()
