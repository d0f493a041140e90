"""One run per source at a time, across every replica: a lease per source in a JetStream KV.

A lease is the key ``<source>`` in the bucket ``<prefix>_leases``, created only if absent
(compare-and-set), refreshed while the run goes on, deleted when it ends. A replica that dies
holding one loses it when the bucket's TTL expires it (per-key TTL is ignored by nats-server 2.9,
so the TTL is the bucket's). Within one process an ``anyio.Lock`` per source queues runs first,
so only one of them competes for the lease.

Releasing leaves a delete marker, so ``create`` of a key released before fails, reads the marker
and writes again: three round trips. A release remembers its marker's revision, and the next
acquire of that source in this process writes over it directly (compare-and-set on the marker):
one round trip, and the usual path when anything else was written since.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.kv import KeyValue

from daemon._logging import get_logger

__all__ = ["Lease", "Leases"]

log = get_logger("leases")


@dataclass(slots=True)
class Lease:
    source: str
    run_id: str
    revision: int


class Leases:
    """Per-source leases in one KV bucket."""

    def __init__(self, kv: KeyValue, js: JetStreamContext, bucket: str) -> None:
        self._kv = kv
        self._js = js
        self._prefix = f"$KV.{bucket}."
        #: Per source: the revision of the delete marker of our last release.
        self._released: dict[str, int] = {}

    async def acquire(self, source: str, run_id: str) -> Lease | None:
        """The lease, or None while another run of ``source`` holds it.

        A lease held for this very run is taken over: JetStream redelivered the command, so
        the process that held it is gone (killed, or silent for longer than ``ack_wait``).
        """
        marker = self._released.pop(source, None)
        if marker is not None:
            # Written only if the key is still our delete marker, as create() would.
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                revision = await self._kv.update(source, run_id.encode(), last=marker)
                return Lease(source, run_id, revision)
        try:
            revision = await self._kv.create(source, run_id.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            try:
                entry = await self._kv.get(source)
            except nats.js.errors.NotFoundError:
                return None  # released meanwhile: the next offer will take it
            if entry.value != run_id.encode() or entry.revision is None:
                return None
            try:
                revision = await self._kv.update(source, run_id.encode(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None
            log.info("lease.taken_over", extra={"source": source, "run_id": run_id})
        return Lease(source, run_id, revision)

    async def refresh(self, lease: Lease) -> None:
        """Write the lease again so the bucket's TTL does not expire it mid-run."""
        try:
            lease.revision = await self._kv.update(
                lease.source, lease.run_id.encode(), last=lease.revision
            )
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning(
                "lease.refresh_failed",
                extra={"source": lease.source, "run_id": lease.run_id, "error": str(exc)},
            )

    async def release(self, lease: Lease) -> None:
        # kv.delete(key, last=…) without its answer: the marker's revision is the ack's sequence.
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            ack = await self._js.publish(
                self._prefix + lease.source,
                headers={
                    "KV-Operation": "DEL",
                    Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(lease.revision),
                },
            )
            self._released[lease.source] = ack.seq
