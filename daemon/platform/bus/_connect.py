"""The first connection to NATS, retried while the server is not up yet.

nats-py never returns from a first connect with ``max_reconnect_attempts=-1`` while no server
answers (it retries inside the call), so each attempt here allows one reconnect per server and fails
with ``NoServersError``; once connected, unlimited reconnects are switched on (nats-py reads
``options["max_reconnect_attempts"]`` at every reconnect). An attempt that fails or is cancelled (a
signal during start-up) closes its client, which leaves no socket or task of nats-py behind.
"""

from __future__ import annotations

import anyio
import nats.errors
from nats.aio.client import Client

from daemon.errors import BusUnavailable
from daemon.platform import phase
from daemon.platform.logs import get_logger
from daemon.platform.nats_auth import AuthClient, NatsAuth, close, connect, shown_url
from daemon.platform.retry import Backoff, Retrying, retry

__all__ = ["connect_nats"]

log = get_logger("bus")

#: Waits between attempts: 0.2 s, doubling up to 5 s.
_BACKOFF = Backoff(first_s=0.2, cap_s=5.0)


async def connect_nats(url: str, timeout_s: float, auth: NatsAuth | None = None) -> Client:
    """A client connected within ``timeout_s``, retrying with backoff: the server may be
    starting too. Past ``timeout_s``: ``BusUnavailable`` naming the server and the last error.

    A server that answers but refuses us (an authorization violation, a certificate that does
    not verify, no TLS where TLS is required: ``nats_auth.refusal``) ends the wait at once
    with ``BusUnavailable`` saying so: the same credentials would be refused until the
    timeout, and a supervisor restarting the daemon retries anyway. Unreadable credential
    files are a ``ConfigError`` before any attempt.
    """
    auth = auth or NatsAuth()
    shown = shown_url(url)
    connected = False
    #: What nats-py reported last (to ``error_cb``), or what the attempt raised.
    last_error: BaseException | None = None

    async def on_error(exc: Exception) -> None:
        nonlocal last_error
        if connected:
            log.warning("bus.error", extra={"error": str(exc) or type(exc).__name__})
        else:
            last_error = exc  # reported once per attempt by bus.connect_retry

    async def on_disconnected() -> None:
        if connected:  # not for each attempt that failed
            log.warning("bus.disconnected")

    async def on_reconnected() -> None:
        log.info("bus.reconnected")

    async def attempt() -> Client:
        nonlocal last_error
        nc = AuthClient(url, auth)  # ConfigError for a credential file it cannot use
        try:
            with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                await connect(
                    nc,
                    on_error,
                    name="coleta",
                    max_reconnect_attempts=1,
                    reconnect_time_wait=1,
                    connect_timeout=5,
                    allow_reconnect=True,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                )
        except BaseException as exc:
            await close(nc)
            # nats-py reports each failure to error_cb and then raises NoServersError; our own
            # deadline raises TimeoutError, maybe before nats-py reported anything.
            last_error = last_error or exc
            raise
        return nc

    def retrying(failed: Retrying) -> None:
        log.warning(
            "bus.connect_retry",
            extra={
                "url": shown,
                "error": _text(last_error),
                "retry": failed.attempt,
                "in_s": failed.delay_s,
            },
        )
        phase.waiting_for(f"NATS at {shown} (connect retry {failed.attempt})")

    deadline = anyio.current_time() + timeout_s
    phase.waiting_for(f"NATS at {shown}")
    try:
        nc = await retry(
            attempt,
            retry_on=_may_pass,
            backoff=_BACKOFF,
            deadline=deadline,
            on_retry=retrying,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        error = _text(last_error or exc)
        raise BusUnavailable(f"cannot reach NATS at {shown} within {timeout_s:g} s: {error}") from (
            last_error or exc
        )
    nc.options["max_reconnect_attempts"] = -1
    connected = True
    return nc


def _may_pass(exc: BaseException) -> bool:
    """A server not up yet, or not answering: worth another attempt. A refusal
    (``BusUnavailable``) or a ``ConfigError`` is final."""
    return isinstance(exc, TimeoutError | OSError | nats.errors.Error)


def _text(exc: BaseException | None) -> str:
    return (str(exc) or type(exc).__name__) if exc is not None else "no answer"
