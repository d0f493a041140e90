"""The fetcher's copy of ``source_state``: written after each commit, and again until it takes.

The fetcher has no database access: it reads how a source's next run asks (validators, the
incremental cursor) from the key-value bucket ``<prefix>_sources``. A copy that fails (the
bucket's node failing over on a cluster, NATS restarting) is tried again with backoff until
it succeeds, not left for the source's next commit: by then its next run would have asked
with the old cursor and stored the last range again. PostgreSQL stays the source of truth;
each copy reads the rows as they are when it is made, one copy at a time, so an older row
never overwrites a newer one.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from contracts import encode
from daemon.errors import classify
from daemon.platform.bus import Bus
from daemon.platform.logs import get_logger
from daemon.platform.retry import Backoff
from daemon.writer._store import Store

__all__ = ["SourceStates"]

log = get_logger("writer")

#: Waits before copying again after a failure: 0.5 s, doubling up to 10 s.
_AGAIN = Backoff(first_s=0.5, cap_s=10.0)


class SourceStates:
    """Copies ``source_state`` rows into ``<prefix>_sources``."""

    def __init__(self, bus: Bus, store: Store) -> None:
        self._bus = bus
        self._store = store
        self._copying = anyio.Lock()
        #: Sources whose last copy failed; ``_all_behind``: every source's (at start-up).
        self._behind: set[str] = set()
        self._all_behind = False
        self._failed = anyio.Event()

    async def copy(self, sources: Sequence[str] | None = None) -> bool:
        """Copy the rows of ``sources`` (None: all); False when the copy failed, which is
        logged, never raised (the data is committed), and tried again by ``run``."""
        async with self._copying:
            try:
                for source, state in await self._store.source_states(sources):
                    await self._bus.kv_put(self._bus.sources, source, encode(state))
            except Exception as exc:
                log.warning("write.source_state_unpublished", extra={"error": str(classify(exc))})
                if sources is None:
                    self._all_behind = True
                else:
                    self._behind.update(sources)
                self._failed.set()
                return False
        return True

    async def run(self) -> None:
        """Copy every row at start-up (the copy may be behind: a copy failed before a stop, a
        new bucket), then every copy that failed again, until it succeeds."""
        await self.copy()
        failures = 0
        while True:
            await self._failed.wait()
            failures += 1
            await anyio.sleep(_AGAIN.delay(failures))
            self._failed = anyio.Event()
            sources = None if self._all_behind else sorted(self._behind)
            self._all_behind, self._behind = False, set()
            if await self.copy(sources):
                failures = 0
                log.info("write.source_state_published", extra={"sources": sources or "all"})
