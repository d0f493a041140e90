"""Pure schedule arithmetic: next fire times, slot windows and run ids.

Cron expressions are evaluated in the source's IANA timezone (croniter needs a ``ZoneInfo``
start time, not a fixed offset, or local times drift after a DST change). Rules across DST:

* a slot that falls into the spring-forward gap fires at the first valid time after it
  (02:30 on a night that skips 02:00-03:00 fires at 03:00);
* a slot whose wall-clock time repeats in the autumn fires once, at its first occurrence
  (croniter yields both; the second, ``fold=1``, is skipped here).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

__all__ = ["Schedule", "check_cron", "check_timezone", "run_id_for"]


def check_cron(expr: str) -> None:
    """Raise ValueError unless ``expr`` is 5-field cron, or 6 fields with seconds first."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"expected 5 cron fields (or 6 with seconds first), got {expr!r}")
    if not croniter.is_valid(expr, second_at_beginning=len(fields) == 6):
        raise ValueError(f"invalid cron expression {expr!r}")


def check_timezone(name: str) -> ZoneInfo:
    """The ``ZoneInfo`` for an IANA name, or ValueError naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown timezone {name!r} (expected an IANA name like 'Europe/Lisbon')"
        ) from exc


def _is_repeat(local: datetime) -> bool:
    """True for the second occurrence of an autumn wall-clock time."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


@dataclass(frozen=True, slots=True)
class Schedule:
    """One source's cron expression in its timezone."""

    expr: str
    tz: ZoneInfo

    @classmethod
    def parse(cls, expr: str, timezone: str = "UTC") -> Schedule:
        """The validated schedule; parsed once per (expression, timezone) and then shared."""
        return _parse(expr, timezone)

    def _iter(self, start: datetime) -> croniter:
        local = start.astimezone(self.tz)
        return croniter(self.expr, local, second_at_beginning=len(self.expr.split()) == 6)

    def next_after(self, t: datetime) -> datetime:
        """The first slot strictly after ``t``, as an aware UTC datetime."""
        return _next_after(self, t)

    def prev_at_or_before(self, t: datetime) -> datetime:
        """The last slot at or before ``t`` (UTC): the start of the window ending after it."""
        nxt = self.next_after(t)
        it = self._iter(nxt)
        while True:
            local: datetime = it.get_prev(datetime)
            if not _is_repeat(local) and local <= t:
                return local.astimezone(UTC)

    def between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Slots in ``[start, end]``, oldest first, as aware UTC datetimes: one croniter walk,
        so thousands of slots cost milliseconds, not seconds."""
        it = self._iter(start - timedelta(microseconds=1))
        while True:
            local: datetime = it.get_next(datetime)
            if local > end:
                return
            if not _is_repeat(local) and local >= start:
                yield local.astimezone(UTC)

    def prev_before(self, slot: datetime) -> datetime:
        """The slot before ``slot``: a run's ``interval_start``."""
        return _prev_before(self, slot)


def run_id_for(source: str, scheduled_for: datetime, *, suffix: str = "") -> str:
    """Deterministic run id of a slot: ``<source>@<UTC slot>``; also the ``Nats-Msg-Id``."""
    stamp = scheduled_for.astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    frac = scheduled_for.microsecond
    base = f"{source}@{stamp}{f'.{frac:06d}' if frac else ''}Z"
    return f"{base}-{suffix}" if suffix else base


# Sources sharing a schedule share its slots: 10,000 sources on ``* * * * *`` ask for the same
# next and previous slot at every boundary. Each answer costs ~60 us of croniter; a cached one,
# ~0.3 us. Keyed by (schedule, instant), so any number of schedules stays correct.
@functools.lru_cache(maxsize=16384)
def _next_after(schedule: Schedule, t: datetime) -> datetime:
    it = schedule._iter(t)
    while True:
        local: datetime = it.get_next(datetime)
        if not _is_repeat(local) and local > t:
            return local.astimezone(UTC)


@functools.lru_cache(maxsize=16384)
def _prev_before(schedule: Schedule, slot: datetime) -> datetime:
    it = schedule._iter(slot)
    while True:
        local: datetime = it.get_prev(datetime)
        if not _is_repeat(local) and local < slot:
            return local.astimezone(UTC)


@functools.lru_cache(maxsize=65536)
def _parse(expr: str, timezone: str) -> Schedule:
    # Validating costs ~80 µs, and every tick, queued run and fetch asks for its source's
    # schedule: parse each (expression, timezone) once. Errors are not cached.
    check_cron(expr)
    return Schedule(expr, check_timezone(timezone))
