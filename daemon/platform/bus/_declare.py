"""Declaring coleta's streams, buckets and durable consumers, and declaring them again.

Streams and consumers are declared idempotently at start-up, so every replica (and every
restart) can run the same code. Across a server restart nats-py reconnects by itself (forever)
and re-subscribes, and pull subscriptions keep working on a durable consumer, so nothing needs
re-binding. A server back *without* its JetStream store (no volume, a wiped disk) has no
streams or consumers any more: a fetch then fails with 503/404 and a publish finds no stream,
and either makes the bus declare everything again (``recover``) instead of failing until an
operator restarts us.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from contracts import Subjects
from daemon.errors import BusUnavailable, FatalError, nats_errors
from daemon.platform.logs import get_logger

__all__ = ["REDECLARE_EVERY_S", "BusOptions", "Declared"]

log = get_logger("bus")

#: Declaring again after streams went missing happens at most this often (every stage asks).
REDECLARE_EVERY_S = 1.0

#: What nats-py raises when a stream, consumer or bucket does not exist (any more).
_MISSING = (
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.NotFoundError,
    nats.js.errors.ServiceUnavailableError,
)


@dataclass(frozen=True, slots=True)
class BusOptions:
    """Stream and consumer settings taken from the daemon settings."""

    max_age_s: float
    duplicate_window_s: float
    ack_wait_s: float = 30.0
    #: Deliveries of one message to the writer's consumers, at most. The writer holds a batch
    #: while PostgreSQL is down instead of handing it back, so deliveries add up only when a
    #: process dies or hangs holding the message: past this it becomes a dead letter
    #: (``dead_letters``), never an endless redelivery and never a silent drop.
    max_deliver: int = 20
    #: Deliveries of one collect command to the fetcher, at most: the largest retry budget of
    #: any source (``retries.max_attempts``) plus room for hand-backs (shutdown, bus refusals).
    fetch_max_deliver: int = 20
    replicas: int = 1
    #: ``file`` or ``memory``: where JetStream keeps the streams.
    storage: str = "file"


class Declared:
    """A connected NATS client with coleta's streams, buckets and consumers declared."""

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

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def declare(self) -> None:
        """Create the streams, buckets and durable consumers, or bring their limits (age,
        replicas, deliveries) in line with the settings (idempotent).

        A limit JetStream cannot change (a stream's storage, replicas beyond the cluster's
        size) raises ``FatalError`` naming the stream, the setting and JetStream's reason;
        JetStream not answering, ``BusUnavailable``.
        """
        with nats_errors("declaring the streams"):
            await self._declare()

    async def _declare(self) -> None:
        s, o = self.subjects, self.options
        streams = (
            (s.collect_stream, s.collect_all),
            (s.raw_stream, s.raw_all),
            (s.dlq_stream, s.dlq_all),
            (s.defer_stream, s.deferred_all),
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
        await self._ensure_consumer(
            s.collect_stream,
            s.fetcher_consumer,
            max_ack_pending=256,
            max_deliver=o.fetch_max_deliver,
        )
        await self._ensure_consumer(
            s.collect_stream, s.runs_consumer, max_ack_pending=10_000, max_deliver=o.max_deliver
        )
        await self._ensure_consumer(
            s.raw_stream, s.writer_consumer, max_ack_pending=10_000, max_deliver=o.max_deliver
        )
        await self._ensure_bodies()
        self.leases = await self._ensure_kv(s.leases_bucket, ttl=max(5.0, 3 * o.ack_wait_s))
        # Progress outlives no stream message: its TTL is the streams' max age.
        self.progress = await self._ensure_kv(s.progress_bucket, ttl=o.max_age_s)
        self.sources = await self._ensure_kv(s.sources_bucket, ttl=None)

    async def _ensure_kv(self, bucket: str, *, ttl: float | None) -> KeyValue:
        """A key-value bucket with the settings' replicas and ``ttl`` (file storage).

        ``create_key_value`` on an existing bucket changes nothing (not its replicas, TTL or
        storage): an existing bucket's stream ``KV_<bucket>`` is brought in line like any stream.
        """
        try:
            kv = await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_key_value(
                bucket=bucket,
                history=1,
                ttl=ttl,
                storage=StorageType.FILE,
                replicas=self.options.replicas,
            )
        await self._align(f"KV_{bucket}", max_age=ttl)
        return kv

    async def _align(self, stream: str, *, max_age: float | None) -> None:
        """Update a bucket's stream whose replicas or age limit differ from the settings."""
        config = (await self.js.stream_info(stream)).config
        want_age = max_age or 0.0
        if (
            config.num_replicas == self.options.replicas
            and abs((config.max_age or 0.0) - want_age) < 0.001
        ):
            return
        config.num_replicas = self.options.replicas
        config.max_age = want_age
        await self._update_stream(config)

    async def _update_stream(self, config: StreamConfig) -> None:
        """``update_stream``, with JetStream's refusal turned into a clear ``FatalError``."""
        try:
            await self.js.update_stream(config)
        except nats.js.errors.APIError as exc:
            raise FatalError(
                f"cannot bring stream {config.name} in line with the settings"
                f" (stream_replicas = {config.num_replicas}, max age {config.max_age or 0:g} s):"
                f" JetStream says {exc.description or exc} (error {exc.err_code})"
            ) from exc
        log.info(
            "bus.stream_updated",
            extra={
                "stream": config.name,
                "replicas": config.num_replicas,
                "max_age_s": config.max_age,
            },
        )

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
        else:
            await self._align(f"OBJ_{bucket}", max_age=self.options.max_age_s)

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
            except (BusUnavailable, FatalError) as exc:
                log.warning(
                    "bus.redeclare_failed",
                    extra={"reason": reason, "error": str(exc) or type(exc).__name__},
                )
                return
            self.redeclared += 1
            log.warning("bus.redeclared", extra={"reason": reason})

    async def recover_after(self, exc: BaseException) -> None:
        """Declare again when ``exc`` (or its cause) says a stream or bucket is missing: a
        server that lost its store, or someone deleted it."""
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, _MISSING):
                await self.recover(f"{type(seen).__name__}: {seen}")
                return
            seen = seen.__cause__

    async def _ensure_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            info = await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.APIError as exc:
                raise FatalError(
                    f"cannot create stream {config.name} (stream_replicas ="
                    f" {config.num_replicas}, stream_storage = {_storage(config)}): JetStream"
                    f" says {exc.description or exc} (error {exc.err_code})"
                ) from exc
            return
        if info.config.storage is not None and info.config.storage != config.storage:
            raise FatalError(
                f"stream_storage: stream {config.name} is kept in {_storage(info.config)}"
                f" storage, not {_storage(config)}; JetStream cannot change a stream's"
                " storage: set stream_storage back, or move the stream (nats stream backup,"
                " delete, restore) first"
            )
        await self._update_stream(config)

    async def _ensure_consumer(
        self, stream: str, durable: str, *, max_ack_pending: int, max_deliver: int
    ) -> None:
        config = ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.options.ack_wait_s,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
        )
        # Creating an existing durable with new settings updates it and keeps its position.
        await self.js.add_consumer(stream, config)


def _storage(config: StreamConfig) -> str:
    storage = config.storage
    return storage.value if isinstance(storage, StorageType) else str(storage)
