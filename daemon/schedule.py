"""Pure schedule arithmetic: next fire times and slot windows.

Cron expressions are evaluated in the source's IANA timezone (croniter needs a ``ZoneInfo``
start time, not a fixed offset, or local times drift after a DST change). Rules across DST are
Vixie cron's:

* a schedule whose hour field is a wildcard (``*``, ``*/n``) runs at every real instant it
  names: an hourly schedule runs 25 times on the autumn day (both 02:00s) and 23 times in the
  spring (there is no 02:00); a wildcard names instants, and the repeated hour is real time;
* a schedule with fixed hours (``30 2 * * *``, ``0 1,2,3 * * *``) runs each local time once: a
  slot in the spring-forward gap fires at the first valid time after it (02:30 on a night that
  skips 02:00-03:00 fires at 03:00), a slot whose wall-clock time repeats in the autumn fires at
  its first occurrence (croniter yields both; the second, ``fold=1``, is skipped here).

Either way a slot is one UTC instant, so run ids (``<source>@<UTC slot>``, ``daemon.ids``) never
collide.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

__all__ = [
    "INTERVALS_FROM",
    "INTERVAL_PROBE_DAYS",
    "INTERVAL_SLOTS",
    "Schedule",
    "check_cron",
    "check_timezone",
]


def check_cron(expr: str) -> None:
    """Raise ValueError unless ``expr`` is 5-field cron, or 6 fields with seconds first, that
    some date matches."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"expected 5 cron fields (or 6 with seconds first), got {expr!r}")
    if not croniter.is_valid(expr, second_at_beginning=len(fields) == 6):
        raise ValueError(f"invalid cron expression {expr!r}")
    try:  # valid field by field, yet no date may match (``0 0 30 2 *``): it would never run
        croniter(expr, INTERVALS_FROM, second_at_beginning=len(fields) == 6).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"cron expression {expr!r} matches no date: it would never run") from None


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


def _wildcard_hours(expr: str) -> bool:
    """Whether the hour field (the third of six fields, seconds first) is ``*`` or ``*/n``."""
    fields = expr.split()
    return fields[2 if len(fields) == 6 else 1].startswith("*")


@dataclass(frozen=True, slots=True)
class Schedule:
    """One source's cron expression in its timezone."""

    expr: str
    tz: ZoneInfo

    def _skips(self, local: datetime) -> bool:
        """Whether croniter's ``local`` is not a slot: a repeated wall-clock time of a schedule
        with fixed hours (a wildcard-hour schedule runs the repeated hour too)."""
        return _is_repeat(local) and not _wildcard_hours(self.expr)

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
            if not self._skips(local) and local <= t:
                return local.astimezone(UTC)

    def between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Slots in ``[start, end]``, oldest first, as aware UTC datetimes: one croniter walk,
        so thousands of slots cost milliseconds, not seconds."""
        it = self._iter(start - timedelta(microseconds=1))
        while True:
            local: datetime = it.get_next(datetime)
            if local > end:
                return
            if not self._skips(local) and local >= start:
                yield local.astimezone(UTC)

    def prev_before(self, slot: datetime) -> datetime:
        """The slot before ``slot``: a run's ``interval_start``.

        Every instant between two slots has the same answer, the earlier slot: the window
        ``(prev, next]`` last found is kept per schedule, so the manual triggers of a burst
        (each at its own instant) cost one croniter walk, not one each (~120 µs).
        """
        window = _windows.get(self)
        if window is not None and window[0] < slot <= window[1]:
            return window[0]
        prev = _prev_before(self, slot)
        if len(_windows) >= _MAX_WINDOWS:
            _windows.clear()
        _windows[self] = (prev, _next_after(self, prev))
        return prev

    def longest_interval_s(self) -> float:
        """The longest time between two consecutive slots, in seconds: the default of how often
        a source is expected to store a run.

        Looked for from a fixed instant (``INTERVALS_FROM``), so every process agrees: among
        the first ``INTERVAL_SLOTS`` slots, and, when those span less than
        ``INTERVAL_PROBE_DAYS`` days (a schedule firing many times a day), also around each
        midnight UTC of those days, which finds the pauses of nights, weekends and months.
        Cached per schedule: ~2-6 ms of croniter the first time.
        """
        return _longest_interval(self)


# Sources sharing a schedule share its slots: 10,000 sources on ``* * * * *`` ask for the same
# next and previous slot at every boundary. Each answer costs ~60 us of croniter; a cached one,
# ~0.3 us. Keyed by (schedule, instant), so any number of schedules stays correct.
@functools.lru_cache(maxsize=16384)
def _next_after(schedule: Schedule, t: datetime) -> datetime:
    it = schedule._iter(t)
    while True:
        local: datetime = it.get_next(datetime)
        if not schedule._skips(local) and local > t:
            return local.astimezone(UTC)


#: Per schedule, the last ``(prev, next]`` window of ``prev_before``: no slot lies inside it.
_windows: dict[Schedule, tuple[datetime, datetime]] = {}
_MAX_WINDOWS = 65536


@functools.lru_cache(maxsize=16384)
def _prev_before(schedule: Schedule, slot: datetime) -> datetime:
    it = schedule._iter(slot)
    while True:
        local: datetime = it.get_prev(datetime)
        if not schedule._skips(local) and local < slot:
            return local.astimezone(UTC)


#: Where ``Schedule.longest_interval_s`` looks: from this instant, this many slots, and for a
#: dense schedule the pauses around this many midnights.
INTERVALS_FROM = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL_SLOTS = 32
INTERVAL_PROBE_DAYS = 8


@functools.lru_cache(maxsize=65536)
def _longest_interval(schedule: Schedule) -> float:
    # Walked with croniter directly: a few dozen slots per schedule would only push the
    # ticker's shared answers out of the ``_next_after`` cache.
    # ``check_cron`` refused an expression no date matches: every walk finds slots.
    walk = _slots_after(schedule, INTERVALS_FROM)
    slots = [next(walk) for _ in range(INTERVAL_SLOTS + 1)]
    longest = max(b - a for a, b in itertools.pairwise(slots))
    if slots[-1] - slots[0] < timedelta(days=INTERVAL_PROBE_DAYS):
        for day in range(INTERVAL_PROBE_DAYS):
            probe = INTERVALS_FROM + timedelta(days=day)
            nxt = next(_slots_after(schedule, probe))
            longest = max(longest, nxt - _slot_at_or_before(schedule, probe, nxt))
    return longest.total_seconds()


def _slots_after(schedule: Schedule, t: datetime) -> Iterator[datetime]:
    it = schedule._iter(t)
    while True:
        local: datetime = it.get_next(datetime)
        if not schedule._skips(local) and local > t:
            yield local.astimezone(UTC)


def _slot_at_or_before(schedule: Schedule, t: datetime, nxt: datetime) -> datetime:
    it = schedule._iter(nxt)
    while True:
        local: datetime = it.get_prev(datetime)
        if not schedule._skips(local) and local <= t:
            return local.astimezone(UTC)


@functools.lru_cache(maxsize=65536)
def _parse(expr: str, timezone: str) -> Schedule:
    # Validating costs ~80 µs, and every tick, queued run and fetch asks for its source's
    # schedule: parse each (expression, timezone) once. Errors are not cached.
    check_cron(expr)
    return Schedule(expr, check_timezone(timezone))
