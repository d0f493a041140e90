"""Wall-clock time for the ticker, replaceable in tests and benchmarks.

Wall-clock instants are timezone-aware UTC; intervals use the event loop's monotonic clock.
``ManualClock`` lets a test move time forward instead of waiting for a cron minute.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio

__all__ = ["Clock", "ManualClock", "SystemClock"]

#: The system clock re-reads the time at least this often while sleeping (clock jumps, suspend).
_MAX_NAP_S = 30.0


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        # A loop, not one sleep: the wall clock may jump (NTP, suspend) while we wait.
        while (delay := (when - self.now()).total_seconds()) > 0:  # noqa: ASYNC110
            await anyio.sleep(min(delay, _MAX_NAP_S))


class ManualClock:
    """A clock that only moves when told to; sleepers wake when their time has come."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start time")
        self._now = start
        self._moved = anyio.Event()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        while self._now < when:
            await self._moved.wait()

    def set(self, when: datetime) -> None:
        self._now = when
        self._moved.set()
        self._moved = anyio.Event()

    def advance(self, delta: timedelta | float) -> None:
        self.set(self._now + (delta if isinstance(delta, timedelta) else timedelta(seconds=delta)))
