"""Talking to a running daemon: find its NATS, connect, ask an endpoint, decode the reply.

Every request is a contract and every reply is decoded with its contract; an error reply's body
is an ``ErrorReply``. Whatever goes wrong is one line for stderr and an exit code
(``ClientFailure``): the daemon or its NATS unreachable (3), an error reply (1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import msgspec
from nats.aio.client import Client

from contracts import ErrorReply, Subjects, encode
from daemon.errors import (
    EXIT_UNREACHABLE,
    BusUnavailable,
    ConfigError,
    PermanentError,
    nats_errors,
)
from daemon.platform.embedded import read_state_urls
from daemon.platform.nats_auth import AuthClient, NatsAuth, close, connect, shown_url
from daemon.settings import NATS_ENV, apply_nats_env, parse_settings, read_toml

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "ClientFailure",
    "Request",
    "client_server",
    "open_request",
]

#: Pause before another attempt at a server that reset the connection.
_RESET_WAIT_S = 0.1

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2

#: Endpoints that may take long to answer: a backfill publishes up to 10,000 commands; a
#: trigger during a cluster failover waits for JetStream's new leader (5 to 10 s), and giving up
#: sooner says "no reply" for a run that is queued, which a second trigger would queue again.
_SLOW_ENDPOINTS = {"backfill": 300.0, "trigger": 20.0}


def client_server(args: argparse.Namespace) -> tuple[str, str, NatsAuth]:
    """The NATS URL, bus prefix and NATS credentials of the daemon to talk to.

    Only ``nats_url``, the NATS credentials (natscli's ``NATS_*`` variables winning, as for
    the daemon), ``bus_prefix`` and ``state_dir`` are read from the config, without validating
    the rest: a client must still reach a daemon whose file is being edited, and needs none of
    its other secrets. A daemon found through ``<state_dir>/nats.url`` runs the embedded
    nats-server: its generated credentials, kept beside it, are used.
    """
    data: dict[str, Any] = {}
    path = args.config or os.environ.get("COLETA_CONFIG")
    if path:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such file")
        with contextlib.suppress(ConfigError):  # unreadable, not TOML: the defaults will do
            data = read_toml(path)
    prefix = os.environ.get("COLETA_BUS_PREFIX") or str(data.get("bus_prefix") or "coleta")
    state_dir = os.environ.get("COLETA_STATE_DIR") or str(data.get("state_dir") or ".coleta")
    nats = {key: data[key] for key in NATS_ENV.values() if key in data}
    apply_nats_env(nats, path or "environment", os.environ, os.environ)
    configured = parse_settings(nats, path or "environment")
    url = args.server or configured.nats_url
    if url is None:
        state = read_state_urls(Path(state_dir))
        if state.nats_url is not None:
            return state.nats_url, prefix, state.nats_auth or NatsAuth()
        url = "nats://127.0.0.1:4222"
    return url, prefix, configured.nats_auth()


class ClientFailure(Exception):
    """One line for stderr, and the exit code to leave with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Request(Protocol):
    """Ask the daemon's ``endpoint`` with ``body``; the reply decoded as ``reply``, or
    ``ClientFailure``."""

    def __call__(
        self, endpoint: str, body: msgspec.Struct | None, reply: type[T]
    ) -> Awaitable[T]: ...


@contextlib.asynccontextmanager
async def open_request(
    url: str, prefix: str, auth: NatsAuth, timeout_s: float
) -> AsyncIterator[Request]:
    """Connected to the daemon's NATS, a ``Request`` for its endpoints."""
    subjects = Subjects(prefix)
    async with _connect(url, timeout_s, auth) as nc:

        async def request(endpoint: str, body: msgspec.Struct | None, reply: type[T]) -> T:
            subject = subjects.endpoint(endpoint)
            wait_s = max(timeout_s, _SLOW_ENDPOINTS.get(endpoint, 0.0))
            data = await _request(nc, url, subject, b"" if body is None else encode(body), wait_s)
            try:
                return msgspec.json.decode(data, type=reply)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ClientFailure(f"unexpected reply on {subject}: {exc}", EXIT_FAILED) from None

        yield request


@contextlib.asynccontextmanager
async def _connect(url: str, timeout_s: float, auth: NatsAuth) -> AsyncIterator[Client]:
    """A connection to the daemon's NATS; ``ClientFailure`` (exit 3) when it cannot be reached
    or refuses us (``nats_auth.refusal`` says why in one line).

    A connection reset means a server is there and closing on us: after a client certificate
    it does not trust, a TLS 1.3 server often resets the client before its alert can be read.
    Such attempts are made again until ``timeout_s``, so the refusal's reason is what the user
    reads; a server that is down still fails at once."""
    deadline = anyio.current_time() + timeout_s
    seen: Exception | None = None  # what nats-py last reported, over all attempts
    while True:
        nc = AuthClient(url, auth)  # ConfigError (exit 2) for a credential file it cannot use
        reset = False

        async def quiet(exc: Exception) -> None:
            """nats-py prints every connection error with a traceback unless told otherwise."""
            nonlocal reset, seen
            reset = reset or isinstance(exc, ConnectionResetError)
            seen = exc

        try:
            with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                # allow_reconnect=False makes nats-py retry a refused first connect forever.
                await connect(
                    nc,
                    quiet,
                    connect_timeout=2,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.1,
                )
        except BaseException as exc:
            await close(nc)
            if isinstance(exc, BusUnavailable):
                raise ClientFailure(str(exc), EXIT_UNREACHABLE) from None
            if not isinstance(exc, Exception):
                raise  # Ctrl-C
            if isinstance(exc, TimeoutError):
                # Cut short by our deadline: the error nats-py last reported says more.
                why = (
                    f"{str(seen) or type(seen).__name__} (gave up after {timeout_s:g} s)"
                    if seen
                    else f"no answer within {timeout_s:g} s"
                )
                raise ClientFailure(
                    f"cannot reach NATS at {shown_url(url)}: {why}", EXIT_UNREACHABLE
                ) from None
            if reset and anyio.current_time() + _RESET_WAIT_S < deadline:
                await anyio.sleep(_RESET_WAIT_S)
                continue
            # nats-py raises several unrelated types for "cannot connect"
            raise ClientFailure(
                f"cannot reach NATS at {shown_url(url)}: {exc or type(exc).__name__}",
                EXIT_UNREACHABLE,
            ) from None
        break
    try:
        yield nc
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()


async def _request(nc: Client, url: str, subject: str, payload: bytes, timeout_s: float) -> bytes:
    """The reply's body; an error reply or no reply raises ``ClientFailure``."""
    shown = shown_url(url)  # the messages below never show a password given in the URL
    try:
        with nats_errors(f"asking {subject}"):
            msg = await nc.request(subject, payload, timeout=timeout_s)
    except BusUnavailable as exc:
        if exc.code == "no_responders":
            message = f"no coleta daemon answers on {subject} at {shown}"
        elif exc.code == "timeout":
            message = f"no reply from the daemon within {timeout_s:g} s ({shown})"
        else:
            message = str(exc)
        raise ClientFailure(message, EXIT_UNREACHABLE) from None
    except PermanentError:  # larger than the server takes
        raise ClientFailure(f"the request to {subject} is too large for NATS", EXIT_USAGE) from None
    headers = msg.headers or {}
    if "Nats-Service-Error" in headers:
        try:
            error = _decode_error(msg.data).error.message
        except (msgspec.DecodeError, msgspec.ValidationError):
            error = headers["Nats-Service-Error"]  # a daemon that sends no ErrorReply body
        raise ClientFailure(error, EXIT_FAILED)
    return msg.data or b"{}"


_decode_error = msgspec.json.Decoder(ErrorReply).decode
