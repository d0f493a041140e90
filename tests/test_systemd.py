"""sd_notify: READY=1 once started, WATCHDOG=1 while healthy, STOPPING=1 at SIGTERM."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import _systemd
from tests._proc import spawn
from tests.fix_http import LocalAPI
from tests.test_cli import clean_env, coleta, write_config


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()


def receive(sock: socket.socket, until: str, within_s: float = 20) -> list[str]:
    """Notifications (one per datagram) up to and including the first containing ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if until in got[-1].splitlines():
            return got
    raise AssertionError(f"no {until} within {within_s} s; got {got}")


def test_notify_reaches_a_path_and_an_abstract_socket(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    assert _systemd.notify("READY=1", "STATUS=x", env={"NOTIFY_SOCKET": path})
    assert sock.recv(100) == b"READY=1\nSTATUS=x"

    name = f"coleta-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        abstract.settimeout(2)
        assert _systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(100) == b"WATCHDOG=1"

    assert not _systemd.notify("READY=1", env={})
    assert _systemd.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert _systemd.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert _systemd.watchdog_interval_s({}) is None


def test_the_daemon_notifies_ready_watchdog_and_stopping(
    notify_socket: tuple[socket.socket, str],
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    sock, path = notify_socket
    config = write_config(
        tmp_path / "coleta.toml",
        f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
        f'[[sources]]\nname = "sd"\nurl = "{api.url("/sd")}"\nschedule = "0 0 1 1 *"\n',
    )
    env = clean_env(
        NATS_URL=nats_url,
        DATABASE_URL=database_url,
        COLETA_CONFIG=str(config),
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="200000",  # a WATCHDOG=1 every 0.1 s
    )
    with spawn(env, tmp_path / "daemon.log") as daemon:
        ready = receive(sock, "READY=1")
        # Ready means ready: the service answers at once.
        assert daemon.events().count('"event":"daemon.ready"') == 1
        assert coleta("health", env=env, timeout=10).returncode == 0
        assert "STATUS=running 1 sources (writer,fetcher,service,ticker)" in ready[-1]
        assert not [n for n in ready if "WATCHDOG=1" in n]  # nothing before READY=1
        watchdogs = receive(sock, "WATCHDOG=1")
        assert receive(sock, "WATCHDOG=1")  # and again
        assert all("STOPPING=1" not in n for n in watchdogs)
        daemon.proc.send_signal(15)
        stopping = receive(sock, "STOPPING=1")
        assert daemon.proc.wait(timeout=15) == 0
        # STOPPING=1 came before the daemon stopped: it is sent as shutdown begins.
        assert stopping[-1].startswith("STOPPING=1")
    assert '"event":"daemon.stopped"' in (tmp_path / "daemon.log").read_text()
