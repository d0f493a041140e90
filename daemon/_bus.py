"""The bus: connect to NATS, declare streams and durable consumers, publish, pull.

Streams and consumers are declared idempotently at start-up, so every replica (and every
restart) can run the same code. Known nats-py behaviour handled here (see STACK-NOTES):
an empty fetch raises either ``nats.errors.TimeoutError`` or a bare ``TimeoutError``;
``drain()`` blocks after a timed-out fetch, so we unsubscribe pull subscriptions and close.

Across a server restart nats-py reconnects by itself (forever) and re-subscribes, and pull
subscriptions keep working on a durable consumer, so nothing needs re-binding. A server back
*without* its JetStream store (no volume, a wiped disk) has no streams or consumers any more:
a fetch then fails with 503/404 and a publish finds no stream, and either makes the bus
declare everything again (``recover``) instead of failing until an operator restarts us.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    ObjectStoreConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from contracts import DeadLetter, Subjects, encode
from daemon import _tracing
from daemon._logging import get_logger
from daemon.errors import TransientError

__all__ = ["Bus", "BusOptions", "Pending", "PullSubscription", "message_size", "message_trace_id"]

log = get_logger("bus")

PullSubscription = JetStreamContext.PullSubscription

#: Longest a body's trip through the object store may take before it counts as a bus failure.
_OBJECT_TIMEOUT_S = 60.0
#: Pull waits are short so a stalled fetch (nats.py #933/#986) costs at most this long.
FETCH_WAIT_S = 2.0
#: Declaring again after streams went missing happens at most this often (every stage asks).
REDECLARE_EVERY_S = 1.0
#: How long a publish may wait for room among the acks in flight, and then for its ack.
_PUBLISH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class BusOptions:
    """Stream and consumer settings taken from the daemon settings."""

    max_age_s: float
    duplicate_window_s: float
    ack_wait_s: float = 30.0
    #: -1: JetStream never gives up on a message by itself. Every nak counts as a delivery
    #: (a fetch retry, an overlapping run held back, a batch handed back while PostgreSQL is
    #: down), and a message past ``max_deliver`` is silently dropped: its run would stay
    #: ``queued`` or ``fetching`` forever. The stages decide when to give up, and record why.
    max_deliver: int = -1
    replicas: int = 1
    #: ``file`` or ``memory``: where JetStream keeps the streams.
    storage: str = "file"


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


def message_size(payload: bytes, headers: Mapping[str, str]) -> int:
    """The bytes NATS counts against ``max_payload``: the payload and its header block."""
    return len(payload) + 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


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


class Bus:
    """A connected NATS client with coleta's streams declared."""

    def __init__(self, nc: Client, subjects: Subjects, options: BusOptions) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.options = options
        self.bodies: ObjectStore | None = None
        #: Times the streams and consumers were declared again after going missing.
        self.redeclared = 0
        self._recovering = anyio.Lock()
        self._recovered_at = -REDECLARE_EVERY_S
        self.leases: KeyValue | None = None
        #: Paginated runs' progress, per run (``<prefix>_progress``).
        self.progress: KeyValue | None = None
        #: The ``source_state`` table's mirror for the fetcher (``<prefix>_sources``).
        self.sources: KeyValue | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, url: str, subjects: Subjects, options: BusOptions, *, connect_timeout_s: float = 60.0
    ) -> AsyncIterator[Bus]:
        """Connect (retrying while the server is not up yet), declare, yield, close."""
        nc = await _connect(url, connect_timeout_s)
        try:
            bus = cls(nc, subjects, options)
            await bus.declare()
            yield bus
        finally:
            with anyio.CancelScope(shield=True):
                # Send what is buffered (the last acks and naks) before closing; close(), not
                # drain(): drain blocks for its whole timeout after a fetch timed out.
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    if nc.is_connected:
                        await nc.flush(timeout=2)
                await nc.close()

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def declare(self) -> None:
        """Create or update the streams and durable consumers (idempotent)."""
        s, o = self.subjects, self.options
        streams = (
            (s.collect_stream, s.collect_all),
            (s.raw_stream, s.raw_all),
            (s.dlq_stream, s.dlq_all),
        )
        for name, subject in streams:
            await self._ensure_stream(
                StreamConfig(
                    name=name,
                    subjects=[subject],
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType(o.storage),
                    max_age=o.max_age_s,
                    duplicate_window=o.duplicate_window_s,
                    num_replicas=o.replicas,
                )
            )
        await self._ensure_consumer(s.collect_stream, s.fetcher_consumer, o.ack_wait_s, 256)
        await self._ensure_consumer(s.collect_stream, s.runs_consumer, o.ack_wait_s, 10_000)
        await self._ensure_consumer(s.raw_stream, s.writer_consumer, o.ack_wait_s, 10_000)
        await self._ensure_bodies()
        await self._ensure_leases()
        await self._ensure_progress()

    async def _ensure_leases(self) -> None:
        """The per-source lease bucket; its TTL frees the lease of a replica that died."""
        bucket = self.subjects.leases_bucket
        try:
            self.leases = await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            self.leases = await self.js.create_key_value(
                bucket=bucket,
                history=1,
                ttl=max(5.0, 3 * self.options.ack_wait_s),
                storage=StorageType.FILE,
                replicas=self.options.replicas,
            )

    async def _ensure_progress(self) -> None:
        """The progress and source-state buckets (idempotent). Progress outlives no stream
        message: its TTL is the streams' max age."""
        s, o = self.subjects, self.options
        buckets = ((s.progress_bucket, o.max_age_s), (s.sources_bucket, None))
        for bucket, ttl in buckets:
            try:
                kv = await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                kv = await self.js.create_key_value(
                    bucket=bucket,
                    history=1,
                    ttl=ttl,
                    storage=StorageType.FILE,
                    replicas=o.replicas,
                )
            if bucket == s.progress_bucket:
                self.progress = kv
            else:
                self.sources = kv

    async def kv_get(self, kv: KeyValue | None, key: str) -> bytes | None:
        """A key's value, or None when absent (or deleted)."""
        assert kv is not None, "declare() creates the buckets"
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise TransientError(f"reading key {key} failed: {exc!r}") from exc
        return entry.value

    async def kv_put(self, kv: KeyValue | None, key: str, value: bytes) -> None:
        assert kv is not None, "declare() creates the buckets"
        try:
            await kv.put(key, value)
        except (nats.errors.Error, TimeoutError) as exc:
            raise TransientError(f"writing key {key} failed: {exc!r}") from exc

    async def kv_delete(self, kv: KeyValue | None, key: str) -> None:
        """Forget a key; failing is harmless (the bucket's TTL forgets it too)."""
        assert kv is not None, "declare() creates the buckets"
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await kv.delete(key)

    async def _ensure_bodies(self) -> None:
        """The object store for bodies too large for one message (idempotent)."""
        bucket = self.subjects.bodies_bucket
        try:
            self.bodies = await self.js.object_store(bucket)
        except nats.js.errors.NotFoundError:
            self.bodies = await self.js.create_object_store(
                bucket,
                config=ObjectStoreConfig(
                    storage=StorageType.FILE,
                    ttl=self.options.max_age_s,
                    replicas=self.options.replicas,
                ),
            )

    async def recover(self, reason: str) -> None:
        """Declare again: the server answered as if streams or consumers did not exist.

        Called by whichever stage notices first; the others wait for it, and nothing is
        declared more than once every ``REDECLARE_EVERY_S``. Failing (JetStream still
        starting) is only logged: the next fetch or publish will ask again.
        """
        async with self._recovering:
            if anyio.current_time() - self._recovered_at < REDECLARE_EVERY_S:
                return
            self._recovered_at = anyio.current_time()
            try:
                await self.declare()
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning(
                    "bus.redeclare_failed",
                    extra={"reason": reason, "error": str(exc) or type(exc).__name__},
                )
                return
            self.redeclared += 1
            log.warning("bus.redeclared", extra={"reason": reason})

    async def _ensure_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
        else:
            await self.js.update_stream(config)

    async def _ensure_consumer(
        self, stream: str, durable: str, ack_wait_s: float, max_ack_pending: int
    ) -> None:
        config = ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=self.options.max_deliver,
            max_ack_pending=max_ack_pending,
        )
        # Creating an existing durable with new settings updates it and keeps its position.
        await self.js.add_consumer(stream, config)

    async def publish(
        self,
        subject: str,
        message: msgspec.Struct,
        *,
        msg_id: str,
        source: str,
        run_id: str,
    ) -> PubAck:
        """Publish a contract and wait for JetStream to accept it.

        A producer span wraps the publish; its context travels in the message headers.
        ``Nats-Msg-Id`` makes a re-publish of the same thing a no-op within the duplicate window.
        """
        return await self.publish_raw(
            subject, encode(message), msg_id=msg_id, source=source, run_id=run_id
        )

    async def publish_raw(
        self, subject: str, payload: bytes, *, msg_id: str, source: str, run_id: str
    ) -> PubAck:
        """Publish bytes already encoded (a dead letter's original message)."""
        with _tracing.producer_span(
            subject, source=source, run_id=run_id, message_id=msg_id, body_size=len(payload)
        ):
            headers = _tracing.inject({"Nats-Msg-Id": msg_id})
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
    ) -> Pending:
        """Publish a contract (or its encoding) without waiting for its ack: ``confirm`` the
        returned handle.

        Many publishes in flight cost one round trip instead of one each (5-7x the rate of
        awaiting every ack). Until it is confirmed a message may be lost, so a caller confirms
        before it records anything that relies on it (a progress mark, the command's ack).
        A message larger than the server takes raises ``MaxPayloadError`` before anything is
        sent; while the connection is down, the publish waits for its ack here (nats-py would
        otherwise buffer it, or refuse it and lose one of its pending slots, below).
        """
        payload = message if isinstance(message, bytes) else encode(message)
        with _tracing.producer_span(
            subject, source=source, run_id=run_id, message_id=msg_id, body_size=len(payload)
        ):
            headers = _tracing.inject({"Nats-Msg-Id": msg_id})
            if message_size(payload, headers) > self.max_payload:
                raise nats.errors.MaxPayloadError
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
                raise TransientError(f"publish to {subject} failed: {exc!r}") from exc
            except (TimeoutError, nats.errors.Error) as exc:
                raise TransientError(f"publish to {subject} failed: {exc!r}") from exc
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
            raise TransientError(f"publish to {pending.subject} failed: {exc!r}") from exc

    async def dead_letter(
        self,
        msg: Msg,
        *,
        source: str,
        run_id: str | None,
        code: str,
        error: str,
        msg_id: str | None = None,
    ) -> None:
        """Keep a message that cannot be processed on ``<prefix>.dlq.<source>``, with why."""
        letter = DeadLetter(
            source=source,
            run_id=run_id,
            subject=msg.subject,
            original=msg.data,
            error_code=code,
            error=error,
            dead_at=datetime.now(UTC),
        )
        seq = msg.metadata.sequence.stream if msg.reply else 0
        await self.publish(
            self.subjects.dlq(source, code),
            letter,
            msg_id=msg_id or f"dlq/{msg.subject}/{seq}",
            source=source,
            run_id=run_id or "",
        )

    async def put_body(self, name: str, body: bytes | io.BufferedIOBase) -> None:
        """Store a large body in the object store (chunked by JetStream): bytes, or a file read
        from its start a chunk at a time, so the body is never whole in memory."""
        assert self.bodies is not None, "declare() creates the bodies bucket"
        if not isinstance(body, bytes):
            body.seek(0)
        try:
            with anyio.fail_after(_OBJECT_TIMEOUT_S):
                await self.bodies.put(name, body)
        except (nats.errors.Error, TimeoutError) as exc:
            raise TransientError(f"storing body {name} failed: {exc!r}") from exc

    async def get_body(self, name: str, into: io.BufferedIOBase) -> int:
        """Write a body from the object store into a file as its chunks arrive (nats-py
        otherwise gathers them, then copies the whole); its size in bytes."""
        assert self.bodies is not None, "declare() creates the bodies bucket"
        try:
            # nats-py reads the chunks through an ordered consumer with no deadline of its own.
            with anyio.fail_after(_OBJECT_TIMEOUT_S):
                result = await self.bodies.get(name, writeinto=into)
        except (nats.errors.Error, TimeoutError) as exc:
            raise TransientError(f"reading body {name} failed: {exc!r}") from exc
        return int(result.info.size or 0)

    async def delete_body(self, name: str) -> None:
        assert self.bodies is not None, "declare() creates the bodies bucket"
        with contextlib.suppress(nats.errors.Error, TimeoutError), anyio.fail_after(10):
            await self.bodies.delete(name)

    async def pull(self, stream: str, durable: str) -> PullSubscription:
        return await self.js.pull_subscribe_bind(durable=durable, stream=stream)

    async def fetch(
        self, sub: PullSubscription, batch: int, wait_s: float = FETCH_WAIT_S
    ) -> list[Msg]:
        """Up to ``batch`` messages, or none after ``wait_s``; never raises on an empty stream."""
        try:
            return await sub.fetch(batch, timeout=wait_s)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.ConnectionClosedError:
            raise
        except nats.errors.Error as exc:
            # Reconnecting, or the server restarting: wait a moment and let the caller loop.
            log.warning("bus.fetch_failed", extra={"error": str(exc) or type(exc).__name__})
            if isinstance(
                exc, nats.js.errors.ServiceUnavailableError | nats.js.errors.NotFoundError
            ):
                # Nobody serves the consumer: JetStream is starting, or lost it with its store.
                await self.recover(f"fetch failed: {exc}")
            await anyio.sleep(0.5)
            return []

    @staticmethod
    async def unsubscribe(sub: PullSubscription) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()

    async def publish_burst(
        self,
        messages: Iterable[tuple[str, bytes, dict[str, str]]],
        *,
        timeout_s: float = 5.0,
        yield_every: int = 256,
        one_by_one_up_to: int = 4,
        recover_once: bool = True,
    ) -> list[PubAck | TransientError]:
        """Publish many ``(subject, payload, headers)`` to JetStream, all acks in flight at once.

        One outcome per message, in order: its ``PubAck``, or a ``TransientError`` for that
        message alone when JetStream refused it, its send failed, or its ack did not come
        within ``timeout_s`` after the last send (a burst of 10,000 costs one round trip, not
        10,000). Messages go to the connection as ``messages`` yields them (a generator can
        stamp each as it goes), and are written every ``yield_every``. The headers are sent
        as given: the caller puts ``Nats-Msg-Id`` and the trace context in them, so a message
        refused here can be published again. Messages no stream took (a server that lost its
        store) make the bus declare again (``recover``) and are sent once more, as in
        ``publish_raw``. Up to ``one_by_one_up_to`` messages go one by one, each awaiting its
        ack (a burst's own ack inbox costs two more writes to the socket, ~0.2 ms each here).
        """
        first: list[tuple[str, bytes, dict[str, str]]] = []
        rest = iter(messages)
        for item in rest:
            first.append(item)
            if len(first) > one_by_one_up_to:
                break
        else:
            return [await self._publish_acked(*item) for item in first]

        def all_of_them() -> Iterator[tuple[str, bytes, dict[str, str]]]:
            yield from first
            yield from rest

        inbox = f"{self.nc.new_inbox()}."
        sent: list[tuple[str, bytes, dict[str, str]]] = []
        replies: dict[int, Msg] = {}
        waiting: set[str] = set()
        done = anyio.Event()
        all_sent = False

        async def on_reply(msg: Msg) -> None:
            token = msg.subject[len(inbox) :]
            if token in waiting:
                waiting.discard(token)
                replies[int(token)] = msg
                if all_sent and not waiting:
                    done.set()

        outcomes: dict[int, TransientError] = {}
        try:
            sub = await self.nc.subscribe(f"{inbox}*", cb=on_reply)
        except nats.errors.Error as exc:
            raise TransientError(f"cannot receive publish acks: {exc!r}") from exc
        try:
            for index, (subject, payload, headers) in enumerate(all_of_them()):
                sent.append((subject, payload, headers))
                token = str(index)
                waiting.add(token)
                try:
                    await self.nc.publish(subject, payload, reply=inbox + token, headers=headers)
                except nats.errors.MaxPayloadError:
                    raise
                except (TimeoutError, nats.errors.Error) as exc:
                    waiting.discard(token)
                    outcomes[index] = TransientError(f"publish to {subject} failed: {exc!r}")
                if index % yield_every == yield_every - 1:
                    await anyio.lowlevel.checkpoint()  # the client writes what is queued
            all_sent = True
            if waiting:
                with anyio.move_on_after(timeout_s):
                    await done.wait()
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        results: list[PubAck | TransientError] = []
        no_stream: list[int] = []
        for index, (subject, _, _) in enumerate(sent):
            if index in outcomes:
                results.append(outcomes[index])
                continue
            reply = replies.get(index)
            if reply is None:
                results.append(TransientError(f"publish to {subject}: no ack in {timeout_s} s"))
            elif reply.headers and reply.headers.get("Status") == "503":
                no_stream.append(index)  # no responders: no stream takes the subject
                results.append(TransientError(f"publish to {subject}: no stream"))
            else:
                answer = msgspec.json.decode(reply.data)
                if "error" in answer:
                    error = answer["error"]
                    results.append(TransientError(f"publish to {subject} refused: {error}"))
                else:
                    results.append(PubAck.from_response(answer))
        if no_stream and recover_once:
            await self.recover(f"no stream for {sent[no_stream[0]][0]}")
            again = await self.publish_burst(
                (sent[index] for index in no_stream),
                timeout_s=timeout_s,
                yield_every=yield_every,
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
        except nats.errors.MaxPayloadError:
            raise
        except (TimeoutError, nats.errors.Error) as exc:
            refused = TransientError(f"publish to {subject} failed: {exc!r}")
            refused.__cause__ = exc
            return refused


async def _connect(url: str, timeout_s: float) -> Client:
    """Connect, retrying with backoff until ``timeout_s``: the server may be starting too."""

    async def on_error(exc: Exception) -> None:
        log.warning("bus.error", extra={"error": str(exc) or type(exc).__name__})

    async def on_disconnected() -> None:
        log.warning("bus.disconnected")

    async def on_reconnected() -> None:
        log.info("bus.reconnected")

    deadline = anyio.current_time() + timeout_s
    delay = 0.2
    while True:
        try:
            return await nats.connect(
                # "nats://a:4222,nats://b:4222": a cluster's seed servers.
                [server.strip() for server in url.split(",")],
                name="coleta",
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=5,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            if anyio.current_time() + delay > deadline:
                raise TransientError(f"cannot connect to NATS at {url}: {exc}") from exc
            log.warning("bus.connect_retry", extra={"url": url, "error": str(exc), "in_s": delay})
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
