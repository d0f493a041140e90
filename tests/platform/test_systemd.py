"""sd_notify: READY=1 once started, WATCHDOG=1 while healthy, STOPPING=1 at SIGTERM."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.platform import systemd
from tests._proc import clean_env, coleta, spawn, write_config
from tests.fix_http import LocalAPI


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
    assert systemd.notify("READY=1", "STATUS=x", env={"NOTIFY_SOCKET": path})
    assert sock.recv(100) == b"READY=1\nSTATUS=x"

    name = f"coleta-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        abstract.settimeout(2)
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(100) == b"WATCHDOG=1"

    assert not systemd.notify("READY=1", env={})
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval_s({}) is None


def test_a_manager_that_does_not_read_never_blocks_a_notification(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """Linux queues 10 datagrams on a socket nobody reads: the 11th send blocked, on the
    event loop, so the daemon stopped answering anything (seen as a health request with no
    reply while a test was not reading its notify socket). Now a notification without room
    is dropped at once."""
    _, path = notify_socket
    sent: list[bool] = []
    sender = threading.Thread(
        target=lambda: sent.extend(
            systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": path}) for _ in range(50)
        ),
        daemon=True,
    )
    sender.start()
    sender.join(timeout=5)
    assert not sender.is_alive(), "notify blocked on a full socket"
    assert sent[0] is True
    assert sent[-1] is False  # dropped: no room


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
        # Ready means ready: the service is subscribed (before it, NATS answers "no
        # responders" at once and the CLI exits 3). This test reads no notification meanwhile:
        # the daemon's pings fill the socket's queue and must not block it (they did, and on a
        # busy machine no reply came at all); the long wait is only for a busy machine.
        assert daemon.events().count('"event":"daemon.ready"') == 1
        assert coleta("health", "--timeout", "30", env=env, timeout=40).returncode == 0
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
