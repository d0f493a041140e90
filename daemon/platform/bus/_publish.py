"""Publishing to JetStream: one message acked, many in flight, or a burst (``_burst``).

Every publish carries ``Nats-Msg-Id`` (``daemon.ids``), so publishing the same thing again
within the duplicate window is a no-op, and a producer span's context (``spans``), so a run is
one trace. A message no stream takes (a server that lost its store) makes the bus declare
again (``recover``) and is sent once more. A refusal is ``BusUnavailable`` (retry later); a
message larger than the server takes, a ``PermanentError`` (``too_large``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from contracts import encode
from daemon.errors import TransientError, from_nats
from daemon.platform import spans, tracing
from daemon.platform.bus._burst import BurstAcks, Frame, NoStream
from daemon.platform.bus._declare import Declared
from daemon.platform.bus._messages import Pending, message_size

__all__ = ["Publishing"]

#: How long a publish may wait for room among the acks in flight, and then for its ack.
_PUBLISH_TIMEOUT_S = 5.0

#: What nats-py's ``publish_async`` raises after it registered the message's future and took
#: one of its pending slots (``publish_async_max_pending``, 4,000): the send itself failed.
_REFUSED_AFTER_REGISTERING = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.MaxPayloadError,
)


def _release_orphan(js: JetStreamContext) -> None:
    """Give back the pending slot of a ``publish_async`` whose send raised.

    nats-py completes the future (and frees the slot) only when an ack arrives, which never
    happens for a message never sent: 4,000 such failures and every later publish stalls. The
    send fails before any await, so the orphan is the future registered last; cancelling it
    runs nats-py's own clean-up.
    """
    futures: dict[str, asyncio.Future[PubAck]] = getattr(js, "_publish_async_futures", {})
    if futures:
        orphan = next(reversed(futures.values()))
        if not orphan.done():
            orphan.cancel()


class Publishing(Declared):
    """Publishing on a declared bus."""

    #: Bursts' writer and acks, made at the first burst.
    _bursts: BurstAcks | None = None

    async def publish(
        self,
        subject: str,
        message: msgspec.Struct,
        *,
        msg_id: str,
        source: str,
        run_id: str,
        traced: bool = True,
    ) -> PubAck:
        """Publish a contract and wait for JetStream to accept it.

        A producer span wraps the publish; its context travels in the message headers.
        ``Nats-Msg-Id`` makes a re-publish of the same thing a no-op within the duplicate window.
        ``traced=False``: no span of its own, the headers carry the current span's context
        (a run's event: the fetcher's span of the run is the hop, ``spans`` module).
        """
        return await self.publish_raw(
            subject, encode(message), msg_id=msg_id, source=source, run_id=run_id, traced=traced
        )

    async def publish_raw(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        source: str,
        run_id: str,
        traced: bool = True,
    ) -> PubAck:
        """Publish bytes already encoded (a dead letter's original message)."""
        with _sending(subject, source, run_id, msg_id, len(payload), traced):
            headers = tracing.inject({"Nats-Msg-Id": msg_id})
            outcome = await self._publish_acked(subject, payload, headers)
            if isinstance(outcome, TransientError):
                raise outcome
            return outcome

    async def forward(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        """Publish bytes with the headers given (a message moved on, its trace context and
        message id set by the caller) and wait for the ack; ``BusUnavailable`` if refused."""
        outcome = await self._publish_acked(subject, payload, headers)
        if isinstance(outcome, TransientError):
            raise outcome
        return outcome

    async def send(
        self,
        subject: str,
        message: msgspec.Struct | bytes,
        *,
        msg_id: str,
        source: str,
        run_id: str,
        traced: bool = True,
    ) -> Pending:
        """Publish a contract (or its encoding) without waiting for its ack: ``confirm`` the
        returned handle (``traced`` as for ``publish``).

        Many publishes in flight cost one round trip instead of one each (5-7x the rate of
        awaiting every ack). Until it is confirmed a message may be lost, so a caller confirms
        before it records anything that relies on it (a progress mark, the command's ack).
        A message larger than the server takes raises ``PermanentError`` (``too_large``)
        before anything is sent; while the connection is down, the publish waits for its ack
        here (nats-py would otherwise buffer it, or refuse it and lose one of its pending
        slots, below).
        """
        payload = message if isinstance(message, bytes) else encode(message)
        with _sending(subject, source, run_id, msg_id, len(payload), traced):
            headers = tracing.inject({"Nats-Msg-Id": msg_id})
            if message_size(payload, headers) > self.max_payload:
                raise from_nats(nats.errors.MaxPayloadError(), f"publish to {subject}")
            return await self.send_raw(subject, payload, headers)

    async def send_raw(self, subject: str, payload: bytes, headers: dict[str, str]) -> Pending:
        """``send`` bytes with the headers given (the caller sets the message id, if any, and
        any expectation such as ``Nats-Expected-Last-Subject-Sequence``); ``confirm`` it."""
        if not self.nc.is_connected:
            done: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
            outcome = await self._publish_acked(subject, payload, headers)
            if isinstance(outcome, TransientError):
                raise outcome
            done.set_result(outcome)
            return Pending(subject, payload, headers, done)
        try:
            future = await self.js.publish_async(
                subject, payload, headers=headers, wait_stall=_PUBLISH_TIMEOUT_S
            )
        except _REFUSED_AFTER_REGISTERING as exc:
            _release_orphan(self.js)
            raise from_nats(exc, f"publish to {subject}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise from_nats(exc, f"publish to {subject}") from exc
        return Pending(subject, payload, headers, future)

    async def confirm(self, pending: Pending) -> PubAck:
        """Wait for the ack of a ``send``; a publish that found no stream is sent once more."""
        try:
            try:
                with anyio.fail_after(_PUBLISH_TIMEOUT_S):
                    return await pending.future
            except nats.js.errors.NoStreamResponseError:
                await self.recover(f"no stream for {pending.subject}")
                return await self.js.publish(
                    pending.subject, pending.payload, headers=pending.headers
                )
        except (TimeoutError, nats.errors.Error) as exc:
            raise from_nats(exc, f"publish to {pending.subject}") from exc

    async def publish_burst(
        self,
        messages: Iterable[Frame],
        *,
        timeout_s: float = 5.0,
        one_by_one_up_to: int = 4,
        recover_once: bool = True,
    ) -> list[PubAck | TransientError]:
        """Publish many ``(subject, payload, headers)`` to JetStream, all acks in flight at once.

        One outcome per message, in order: its ``PubAck``, or a ``TransientError`` for that
        message alone when JetStream refused it or its ack did not come within ``timeout_s``
        after the last was written (a burst of 10,000 costs one round trip, not 10,000).
        Messages are written to the connection as ``messages`` yields them (a generator can
        stamp each as it goes), without waiting in between (``_burst``). The headers are sent
        as given — a dict, or its ``header_block`` built ahead: the caller puts
        ``Nats-Msg-Id`` and the trace context in them, so a refused message can be published
        again. Messages no stream took (a server that lost its store) make the bus declare
        again (``recover``) and are sent once more, as in ``publish_raw``. Up to
        ``one_by_one_up_to`` messages go one by one, each awaiting its ack.
        """
        first: list[Frame] = []
        rest = iter(messages)
        for item in rest:
            first.append(item)
            if len(first) > one_by_one_up_to:
                break
        else:
            return [
                await self._publish_acked(subject, payload, _as_dict(headers))
                for subject, payload, headers in first
            ]
        if self._bursts is None:
            self._bursts = BurstAcks(self.nc)
        sent = await self._bursts.publish(
            itertools.chain(first, rest), max_payload=self.max_payload, timeout_s=timeout_s
        )
        results = [outcome for _, outcome in sent]
        no_stream = [i for i, outcome in enumerate(results) if isinstance(outcome, NoStream)]
        if no_stream and recover_once:
            await self.recover(f"no stream for {sent[no_stream[0]][0][0]}")
            again = await self.publish_burst(
                (sent[index][0] for index in no_stream),
                timeout_s=timeout_s,
                recover_once=False,
            )
            for index, outcome in zip(no_stream, again, strict=True):
                results[index] = outcome
        return results

    async def _publish_acked(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> PubAck | TransientError:
        """One message published and acked (``publish_raw``, a small ``publish_burst``): its
        ack, or why it was refused."""
        try:
            try:
                return await self.js.publish(subject, payload, headers=headers)
            except nats.js.errors.NoStreamResponseError:
                # No stream takes the subject: the server lost its store. Once more.
                await self.recover(f"no stream for {subject}")
                return await self.js.publish(subject, payload, headers=headers)
        except (TimeoutError, nats.errors.Error) as exc:
            return _refused(exc, subject)


def _as_dict(headers: dict[str, str] | bytes) -> dict[str, str]:
    """Headers as nats-py's ``publish`` takes them, from a ``header_block`` too."""
    if not isinstance(headers, bytes):
        return headers
    lines = headers.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def _sending(
    subject: str, source: str, run_id: str, msg_id: str, size: int, traced: bool
) -> contextlib.AbstractContextManager[object]:
    """The producer span of a publish, or nothing (its headers carry the current span)."""
    if not traced:
        return contextlib.nullcontext()
    return spans.producer_span(
        subject, source=source, run_id=run_id, message_id=msg_id, body_size=size
    )


def _refused(exc: Exception, subject: str) -> TransientError:
    """Why a publish to ``subject`` was refused, to try again later; a message larger than
    the server takes is raised instead (``PermanentError``: no retry makes it fit)."""
    refused = from_nats(exc, f"publish to {subject}")
    if not isinstance(refused, TransientError):
        raise refused from exc
    refused.__cause__ = exc
    return refused
