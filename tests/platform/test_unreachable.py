"""A server that refused us, then did not answer before the deadline: the user reads the refusal.

On a loaded machine the last connection attempt is often cut short by the deadline. Its
``TimeoutError`` says nothing; what PostgreSQL or NATS said to the attempts before it does.
"""

from __future__ import annotations

from typing import Any, NoReturn

import anyio
import psycopg
import pytest

from daemon.cli import _client
from daemon.cli._client import ClientFailure
from daemon.errors import EXIT_UNREACHABLE, BusUnavailable, StoreUnavailable
from daemon.platform import migrate
from daemon.platform.bus import _connect
from daemon.platform.nats_auth import NatsAuth

pytestmark = pytest.mark.anyio

REFUSED = (
    'connection failed: connection to server at "127.0.0.1", port 9 failed: Connection refused'
)


class RefusedThenSilent:
    """The first attempt is refused at once; every later one hangs past any deadline."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self.calls += 1
        on_error = next((a for a in args if callable(a)), None)
        if self.calls == 1:
            if on_error is not None:  # nats-py reports to error_cb, then raises
                await on_error(self.error)
            raise self.error
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def never_connected(nc: object) -> None:
    """Closing a client whose connect never ran (nats-py asserts on it)."""


async def test_postgres_the_refusal_not_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    connect = RefusedThenSilent(psycopg.OperationalError(REFUSED))
    monkeypatch.setattr(psycopg.AsyncConnection, "connect", connect)
    with pytest.raises(StoreUnavailable) as caught:
        await migrate.wait_and_migrate("postgresql://127.0.0.1:9/test", "public", timeout_s=0.6)
    assert connect.calls >= 2  # the deadline cut a later attempt short
    message = str(caught.value)
    assert message.startswith("cannot reach PostgreSQL at postgresql://127.0.0.1:9/test within")
    assert "Connection refused" in message, message


async def test_nats_daemon_the_refusal_not_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    connect = RefusedThenSilent(ConnectionRefusedError(111, "Connect call failed"))
    monkeypatch.setattr(_connect, "connect", connect)
    monkeypatch.setattr(_connect, "close", never_connected)
    with pytest.raises(BusUnavailable) as caught:
        await _connect.connect_nats("nats://127.0.0.1:9", timeout_s=0.6)
    assert connect.calls >= 2
    assert "Connect call failed" in str(caught.value), caught.value


async def test_nats_cli_the_refusal_not_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    connect = RefusedThenSilent(ConnectionResetError(104, "Connection reset by peer"))
    monkeypatch.setattr(_client, "connect", connect)
    monkeypatch.setattr(_client, "close", never_connected)
    monkeypatch.setattr(_client, "_RESET_WAIT_S", 0.05)
    with pytest.raises(ClientFailure) as caught:
        async with _client._connect("nats://127.0.0.1:9", 0.6, NatsAuth()):
            pass
    assert connect.calls >= 2
    assert caught.value.code == EXIT_UNREACHABLE
    message = str(caught.value)
    assert message.startswith("cannot reach NATS at nats://127.0.0.1:9: "), message
    assert "Connection reset by peer" in message, message
