"""One run per source at a time, across every replica: a lease per source in a JetStream KV.

A lease is the key ``<source>`` in the bucket ``<prefix>_leases``, created only if absent
(compare-and-set), refreshed while the run goes on, deleted when it ends. A replica that dies
holding one loses it when the bucket's TTL expires it (per-key TTL is ignored by nats-server 2.9,
so the TTL is the bucket's).

Releasing leaves a delete marker, so ``create`` of a key released before fails, reads the marker
and writes again: three round trips. A release remembers its marker's revision, and the next
acquire of that source in this process writes over it directly (compare-and-set on the marker):
one round trip, and the usual path when anything else was written since.

A release does not wait for its answer (a round trip on the run's path, for nothing the run
needs): it goes out with whatever the connection sends next, and the next acquire of that
source reads the marker's revision from it. A release that failed leaves the lease to the
bucket's TTL, as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from daemon.errors import ColetaError, TransientError
from daemon.platform.bus import Bus, Pending
from daemon.platform.logs import get_logger

__all__ = ["Lease", "Leases"]

log = get_logger("leases")


@dataclass(slots=True)
class Lease:
    source: str
    run_id: str
    revision: int


class Leases:
    """Per-source leases in the bus's leases bucket."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        #: Per source: our last release, whose answer is its delete marker's revision.
        self._released: dict[str, Pending] = {}

    async def acquire(self, source: str, run_id: str) -> Lease | None:
        """The lease, or None while another run of ``source`` holds it.

        A lease held for this very run is taken over: JetStream redelivered the command, so
        the process that held it is gone (killed, or silent for longer than ``ack_wait``).
        A bucket that does not answer raises ``BusUnavailable``: the run is tried again later.
        """
        bus, kv, value = self._bus, self._bus.leases, run_id.encode()
        released = self._released.pop(source, None)
        marker = await self._marker(released) if released is not None else None
        if marker is not None:
            # Written only if the key is still our delete marker, as create() would.
            revision = await bus.kv_update(kv, source, value, last=marker)
            if revision is not None:
                return Lease(source, run_id, revision)
        revision = await bus.kv_create(kv, source, value)
        if revision is None:
            entry = await bus.kv_entry(kv, source)
            if entry is None or entry[0] != value:
                return None  # held by another run, or released meanwhile: the next offer
            revision = await bus.kv_update(kv, source, value, last=entry[1])
            if revision is None:
                return None
            log.info("lease.taken_over", extra={"source": source, "run_id": run_id})
        return Lease(source, run_id, revision)

    async def held(self, source: str) -> bool:
        """Whether some run holds ``source``'s lease now (False when the bucket fails to say:
        the caller then acts as if free, and the lease itself still keeps runs apart)."""
        try:
            return bool(await self._bus.kv_get(self._bus.leases, source))
        except TransientError:
            return False

    async def refresh(self, lease: Lease) -> None:
        """Write the lease again so the bucket's TTL does not expire it mid-run."""
        try:
            revision = await self._bus.kv_update(
                self._bus.leases, lease.source, lease.run_id.encode(), last=lease.revision
            )
        except TransientError as exc:
            revision, error = None, str(exc)
        else:
            error = "another run holds it now"
        if revision is None:
            log.warning(
                "lease.refresh_failed",
                extra={"source": lease.source, "run_id": lease.run_id, "error": error},
            )
            return
        lease.revision = revision

    async def release(self, lease: Lease) -> None:
        """Delete the lease (only if it is still ours), without waiting for the answer;
        failing is harmless (the TTL)."""
        bucket = self._bus.subjects.leases_bucket
        with contextlib.suppress(TransientError):
            self._released[lease.source] = await self._bus.kv_delete_at_later(
                bucket, lease.source, last=lease.revision
            )

    async def _marker(self, released: Pending) -> int | None:
        """The revision of a release's delete marker, or None if it failed (not ours any more,
        the bus refused): the acquire then goes the long way."""
        try:
            return (await self._bus.confirm(released)).seq
        except ColetaError:
            return None
