"""Messages as the stages handle them: where one was, what its headers carry, how it is settled.

A delivered JetStream message is settled once — acked, naked, termed — or kept alive
(``in_progress``); ``settle`` does each shielded, so a settle cut short by a shutdown can only
mean a redelivery, and a dead connection only a warning. Its trace context (``trace_headers``)
travels on to whatever the message becomes next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

__all__ = [
    "Msg",
    "Original",
    "Pending",
    "PubAck",
    "PullSubscription",
    "deliveries",
    "message_size",
    "message_trace_id",
    "settle",
    "trace_headers",
]

PullSubscription = JetStreamContext.PullSubscription


@dataclass(frozen=True, slots=True)
class Original:
    """A message as it was on its stream: what a dead letter keeps of it."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream: str | None = None
    seq: int = 0
    deliveries: int | None = None

    @classmethod
    def of(cls, msg: Msg) -> Original:
        """A delivered message: its stream position and deliveries from its metadata."""
        stream, seq, delivered = None, 0, None
        if msg.reply:
            try:
                meta = msg.metadata
                stream, seq, delivered = meta.stream, meta.sequence.stream, meta.num_delivered
            except (nats.errors.Error, ValueError, IndexError):
                pass
        return cls(msg.subject, msg.data, dict(msg.headers or {}), stream, seq, delivered)


def deliveries(msg: Msg) -> int:
    """How many times JetStream delivered this message, this time included."""
    return msg.metadata.num_delivered if msg.reply else 1


def message_size(payload: bytes, headers: Mapping[str, str]) -> int:
    """The bytes NATS counts against ``max_payload``: the payload and its header block."""
    return len(payload) + 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


def message_trace_id(headers: Mapping[str, str] | None) -> str | None:
    """The trace id carried by a message's W3C ``traceparent`` header."""
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == "traceparent":
            parts = value.split("-")
            if len(parts) >= 3 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                return parts[1]
    return None


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The trace context of a message's headers, to carry over to its next hop."""
    return {
        key: value
        for key, value in (headers or {}).items()
        if key.lower() in ("traceparent", "tracestate") and len(value) < 1024
    }


@dataclass(slots=True)
class Pending:
    """A message sent with ``Bus.send`` whose ack has not been confirmed yet."""

    subject: str
    payload: bytes
    headers: dict[str, str]
    future: asyncio.Future[PubAck]

    def forget(self) -> None:
        """Stop waiting for the ack (the run is being abandoned; a retry publishes again)."""
        if not self.future.done():
            self.future.cancel()
        elif not self.future.cancelled():
            self.future.exception()  # retrieved: no "exception was never retrieved" warning


async def settle(
    action: Callable[[], Awaitable[object]], *, log: logging.Logger, event: str
) -> None:
    """Ack, nak, term or ``in_progress``, shielded: a dead connection only means a
    redelivery, logged as ``event``."""
    with anyio.CancelScope(shield=True):
        try:
            await action()
        except (nats.errors.Error, OSError) as exc:
            log.warning(event, extra={"error": str(exc) or type(exc).__name__})
