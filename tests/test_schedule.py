"""Schedule arithmetic: next fire times, previous slots, DST rules (one run id per slot)."""

from __future__ import annotations

import itertools
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

import daemon.schedule as schedule_module
from daemon.ids import run_id_for
from daemon.schedule import Schedule, check_cron


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def fires(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` slots strictly after ``after``."""
    out: list[datetime] = []
    t = after
    for _ in range(count):
        t = schedule.next_after(t)
        out.append(t)
    return out


# -- plain schedules


def test_utc_daily() -> None:
    daily = Schedule.parse("0 7 * * *")

    assert fires(daily, utc(2026, 1, 1, 6, 59, 59, 999999), 3) == [
        utc(2026, 1, 1, 7),
        utc(2026, 1, 2, 7),
        utc(2026, 1, 3, 7),
    ]


def test_next_after_is_strictly_after() -> None:
    daily = Schedule.parse("0 7 * * *")

    assert daily.next_after(utc(2026, 1, 1, 7)) == utc(2026, 1, 2, 7)


def test_six_fields_have_seconds_first() -> None:
    every_5s = Schedule.parse("*/5 * * * * *")

    assert fires(every_5s, utc(2026, 1, 1, 0, 0, 2), 3) == [
        utc(2026, 1, 1, 0, 0, 5),
        utc(2026, 1, 1, 0, 0, 10),
        utc(2026, 1, 1, 0, 0, 15),
    ]
    assert every_5s.next_after(utc(2026, 1, 1, 0, 0, 5, 500000)) == utc(2026, 1, 1, 0, 0, 10)
    assert every_5s.prev_before(utc(2026, 1, 1, 0, 0, 5)) == utc(2026, 1, 1)
    assert Schedule.parse("30 0 7 * * *").next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 7, 0, 30)


def test_timezone_schedule_returns_aware_utc() -> None:
    tokyo = Schedule.parse("0 9 * * *", "Asia/Tokyo")

    slot = tokyo.next_after(utc(2025, 12, 31, 12))

    assert slot == utc(2026, 1, 1, 0)
    assert slot.tzinfo is UTC


def test_input_in_another_offset_means_the_same_instant() -> None:
    daily = Schedule.parse("0 7 * * *")
    plus_two = timezone(timedelta(hours=2))

    slot = daily.next_after(datetime(2026, 1, 1, 8, 30, tzinfo=plus_two))  # 06:30Z

    assert slot == utc(2026, 1, 1, 7)
    assert slot.tzinfo is UTC


def test_prev_at_or_before_includes_the_slot_itself() -> None:
    daily = Schedule.parse("0 7 * * *")

    assert daily.prev_at_or_before(utc(2026, 1, 1, 7)) == utc(2026, 1, 1, 7)
    assert daily.prev_at_or_before(utc(2026, 1, 1, 6, 59)) == utc(2025, 12, 31, 7)
    assert daily.prev_before(utc(2026, 1, 1, 7)) == utc(2025, 12, 31, 7)


# -- DST: America/New_York 2026 (spring 2026-03-08, fall 2026-11-01)


def test_new_york_spring_forward_gap_fires_once_at_three() -> None:
    at_230 = Schedule.parse("30 2 * * *", "America/New_York")

    assert fires(at_230, utc(2026, 3, 6, 12), 4) == [
        utc(2026, 3, 7, 7, 30),  # 02:30 EST
        utc(2026, 3, 8, 7, 0),  # 02:30 does not exist: 03:00 EDT
        utc(2026, 3, 9, 6, 30),  # 02:30 EDT
        utc(2026, 3, 10, 6, 30),
    ]


def test_new_york_fall_back_fires_once_at_first_occurrence() -> None:
    at_130 = Schedule.parse("30 1 * * *", "America/New_York")

    slots = fires(at_130, utc(2026, 10, 30, 12), 4)

    assert slots == [
        utc(2026, 10, 31, 5, 30),  # 01:30 EDT
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT, the first of two 01:30s
        utc(2026, 11, 2, 6, 30),  # 01:30 EST
        utc(2026, 11, 3, 6, 30),
    ]
    assert utc(2026, 11, 1, 6, 30) not in slots  # 01:30 EST on the repeated hour
    # Even asked from between the two 01:30s, the repeat is not a slot.
    assert at_130.next_after(utc(2026, 11, 1, 5, 30)) == utc(2026, 11, 2, 6, 30)
    assert at_130.next_after(utc(2026, 11, 1, 6)) == utc(2026, 11, 2, 6, 30)


def test_new_york_prev_at_or_before_skips_the_repeat() -> None:
    at_130 = Schedule.parse("30 1 * * *", "America/New_York")

    assert at_130.prev_at_or_before(utc(2026, 11, 1, 6, 30)) == utc(2026, 11, 1, 5, 30)
    assert at_130.prev_at_or_before(utc(2026, 11, 1, 5)) == utc(2026, 10, 31, 5, 30)


def test_new_york_prev_before_across_dst() -> None:
    at_230 = Schedule.parse("30 2 * * *", "America/New_York")
    at_130 = Schedule.parse("30 1 * * *", "America/New_York")

    assert at_230.prev_before(utc(2026, 3, 8, 7)) == utc(2026, 3, 7, 7, 30)
    assert at_230.prev_before(utc(2026, 3, 9, 6, 30)) == utc(2026, 3, 8, 7)
    assert at_130.prev_before(utc(2026, 11, 2, 6, 30)) == utc(2026, 11, 1, 5, 30)
    assert at_130.prev_before(utc(2026, 11, 1, 5, 30)) == utc(2026, 10, 31, 5, 30)


def test_new_york_prev_at_or_before_in_the_gap_day() -> None:
    at_230 = Schedule.parse("30 2 * * *", "America/New_York")

    assert at_230.prev_at_or_before(utc(2026, 3, 8, 6, 59, 59)) == utc(2026, 3, 7, 7, 30)
    assert at_230.prev_at_or_before(utc(2026, 3, 8, 7, 10)) == utc(2026, 3, 8, 7)


# -- DST: Europe/Berlin 2026 (spring 2026-03-29, fall 2026-10-25)


def test_berlin_spring_forward() -> None:
    at_230 = Schedule.parse("30 2 * * *", "Europe/Berlin")

    assert fires(at_230, utc(2026, 3, 27, 12), 3) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 02:30 does not exist: 03:00 CEST
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]
    assert at_230.prev_before(utc(2026, 3, 30, 0, 30)) == utc(2026, 3, 29, 1)
    assert at_230.prev_before(utc(2026, 3, 29, 1)) == utc(2026, 3, 28, 1, 30)


def test_berlin_fall_back() -> None:
    at_230 = Schedule.parse("30 2 * * *", "Europe/Berlin")

    slots = fires(at_230, utc(2026, 10, 23, 12), 3)

    assert slots == [
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first of two
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]
    assert utc(2026, 10, 25, 1, 30) not in slots
    assert at_230.prev_before(utc(2026, 10, 26, 1, 30)) == utc(2026, 10, 25, 0, 30)
    assert at_230.prev_at_or_before(utc(2026, 10, 25, 1, 30)) == utc(2026, 10, 25, 0, 30)


def test_hourly_across_spring_gap_has_no_duplicate() -> None:
    hourly = Schedule.parse("0 * * * *", "America/New_York")

    assert fires(hourly, utc(2026, 3, 8, 5, 30), 3) == [
        utc(2026, 3, 8, 6),  # 01:00 EST
        utc(2026, 3, 8, 7),  # 03:00 EDT (02:00 does not exist)
        utc(2026, 3, 8, 8),  # 04:00 EDT
    ]


# -- run ids


# -- invalid input


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "invalid cron expression '61 * * * *'"),
        ("a b c d e", "invalid cron expression 'a b c d e'"),
        ("*/0 * * * *", "invalid cron expression '*/0 * * * *'"),
        ("0 0 30 2 *", "cron expression '0 0 30 2 *' matches no date: it would never run"),
        ("0 0 0 31 4 *", "cron expression '0 0 0 31 4 *' matches no date: it would never run"),
        ("* * *", "expected 5 cron fields (or 6 with seconds first), got '* * *'"),
        ("", "expected 5 cron fields (or 6 with seconds first), got ''"),
        (
            "* * * * * * *",
            "expected 5 cron fields (or 6 with seconds first), got '* * * * * * *'",
        ),
    ],
)
def test_invalid_cron(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        check_cron(expr)

    with pytest.raises(ValueError, match=exactly(message)):
        Schedule.parse(expr)


def test_a_rare_date_is_a_schedule() -> None:
    """29 February matches once in four years: rare, not never."""
    check_cron("0 0 29 2 *")
    assert Schedule.parse("0 0 29 2 *").next_after(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(
        2028, 2, 29, tzinfo=UTC
    )


def test_unknown_timezone() -> None:
    message = "unknown timezone 'Nowhere/City' (expected an IANA name like 'Europe/Lisbon')"

    with pytest.raises(ValueError, match=exactly(message)):
        Schedule.parse("0 7 * * *", "Nowhere/City")


# -- DST and sub-daily schedules (Vixie cron's rule): a schedule whose hour field is a wildcard
# runs at every real instant it names, the repeated autumn hour included; one with fixed hours
# runs each local time once. Europe/Berlin 2026: 02:00-03:00 is skipped on 03-29 and repeated on
# 10-25.

BERLIN = ZoneInfo("Europe/Berlin")
FALL_BACK = (2026, 10, 25)
SPRING_FORWARD = (2026, 3, 29)


def berlin_day(day: tuple[int, int, int]) -> tuple[datetime, datetime]:
    """The first and last instants (UTC) of a local day in Berlin."""
    first = datetime(*day, tzinfo=BERLIN).astimezone(UTC)
    last = (datetime(*day, tzinfo=BERLIN) + timedelta(days=1)).astimezone(UTC)
    return first, last - timedelta(microseconds=1)


def real_instants(expr: str, day: tuple[int, int, int]) -> list[datetime]:
    """Every quarter-hour instant (UTC) of the Berlin day whose local wall time ``expr`` names."""
    first, last = berlin_day(day)
    quarters = [first + timedelta(minutes=15 * i) for i in range(26 * 4)]
    return [
        t
        for t in quarters
        if t <= last and croniter.match(expr, t.astimezone(BERLIN).replace(tzinfo=None))
    ]


def walk_back(schedule: Schedule, start: datetime, stop: datetime) -> list[datetime]:
    """``prev_before`` from ``start`` down to ``stop`` (inclusive), oldest first."""
    out: list[datetime] = []
    slot = schedule.prev_at_or_before(start)
    while slot >= stop:
        out.append(slot)
        slot = schedule.prev_before(slot)
    return out[::-1]


@pytest.mark.parametrize(
    ("expr", "day", "count"),
    [
        pytest.param("0 * * * *", FALL_BACK, 25, id="hourly-fall-back"),
        pytest.param("0 * * * *", SPRING_FORWARD, 23, id="hourly-spring-forward"),
        pytest.param("*/15 * * * *", FALL_BACK, 100, id="quarter-hourly-fall-back"),
        pytest.param("*/15 * * * *", SPRING_FORWARD, 92, id="quarter-hourly-spring-forward"),
    ],
)
def test_a_wildcard_hour_runs_at_every_real_instant_across_dst(
    expr: str, day: tuple[int, int, int], count: int
) -> None:
    schedule = Schedule.parse(expr, "Europe/Berlin")
    first, last = berlin_day(day)
    expected = real_instants(expr, day)
    assert len(expected) == count

    assert list(schedule.between(first, last)) == expected
    # Slot after slot, forwards and backwards, the same instants.
    assert fires(schedule, first - timedelta(microseconds=1), count) == expected
    assert walk_back(schedule, last, first) == expected
    for slot, nxt in itertools.pairwise(expected):
        assert schedule.prev_before(nxt) == slot
        assert schedule.prev_at_or_before(nxt - timedelta(microseconds=1)) == slot
        assert schedule.prev_at_or_before(slot) == slot
    # One run id per UTC instant: the two 02:00s of the autumn are two runs.
    assert len({run_id_for("s", slot) for slot in expected}) == count


def test_the_repeated_autumn_hour_is_run_twice_by_an_hourly_schedule() -> None:
    hourly = Schedule.parse("0 * * * *", "Europe/Berlin")

    # 02:00 CEST is 00:00Z, 02:00 CET is 01:00Z: both are slots, one hour apart.
    assert hourly.next_after(utc(2026, 10, 24, 23, 30)) == utc(2026, 10, 25, 0)
    assert hourly.next_after(utc(2026, 10, 25, 0)) == utc(2026, 10, 25, 1)
    assert hourly.next_after(utc(2026, 10, 25, 1)) == utc(2026, 10, 25, 2)
    assert hourly.prev_before(utc(2026, 10, 25, 2)) == utc(2026, 10, 25, 1)
    assert hourly.prev_before(utc(2026, 10, 25, 1)) == utc(2026, 10, 25, 0)
    assert hourly.prev_at_or_before(utc(2026, 10, 25, 1, 59)) == utc(2026, 10, 25, 1)
    assert run_id_for("s", utc(2026, 10, 25, 0)) != run_id_for("s", utc(2026, 10, 25, 1))


@pytest.mark.parametrize(
    ("expr", "fall_back", "spring_forward"),
    [
        pytest.param(
            "30 2 * * *",
            [utc(2026, 10, 25, 0, 30)],  # 02:30 CEST, not again at 02:30 CET
            [utc(2026, 3, 29, 1)],  # 02:30 does not exist: 03:00 CEST
            id="daily-in-the-dst-hour",
        ),
        pytest.param(
            "0 30 2 * * *",  # seconds first
            [utc(2026, 10, 25, 0, 30)],
            [utc(2026, 3, 29, 1)],
            id="daily-six-fields",
        ),
        pytest.param(
            "*/30 2 * * *",  # fixed hour, wildcard minutes: each local time once
            [utc(2026, 10, 25, 0), utc(2026, 10, 25, 0, 30)],
            [utc(2026, 3, 29, 1)],
            id="fixed-hour-every-30-minutes",
        ),
        pytest.param(
            "0 1,2,3 * * *",
            [utc(2026, 10, 24, 23), utc(2026, 10, 25, 0), utc(2026, 10, 25, 2)],
            [utc(2026, 3, 29, 0), utc(2026, 3, 29, 1)],  # 02:00 and 03:00 are one instant
            id="a-list-of-hours",
        ),
    ],
)
def test_fixed_hours_run_each_local_time_once_across_dst(
    expr: str, fall_back: list[datetime], spring_forward: list[datetime]
) -> None:
    schedule = Schedule.parse(expr, "Europe/Berlin")
    for day, expected in ((FALL_BACK, fall_back), (SPRING_FORWARD, spring_forward)):
        first, last = berlin_day(day)
        assert list(schedule.between(first, last)) == expected
        assert fires(schedule, first - timedelta(microseconds=1), len(expected)) == expected
        assert walk_back(schedule, last, first) == expected


def test_six_field_wildcard_hour_runs_the_repeated_hour() -> None:
    every_30_min = Schedule.parse("0 */30 * * * *", "Europe/Berlin")  # seconds first
    first, last = berlin_day(FALL_BACK)
    assert len(list(every_30_min.between(first, last))) == 50
    first, last = berlin_day(SPRING_FORWARD)
    assert len(list(every_30_min.between(first, last))) == 46


# -- the longest interval (a source's default freshness)


@pytest.mark.parametrize(
    ("expr", "hours"),
    [
        ("0 7 * * *", 24),
        ("*/15 * * * *", 0.25),
        ("*/10 * * * * *", 10 / 3600),  # seconds first
        ("0 6 * * 1", 7 * 24),
        ("0 9 * * 1-5", 72),  # Friday 09:00 to Monday 09:00
        ("* 9 * * *", 23 + 1 / 60),  # 60 slots a day: the night is found between them
        ("*/5 9-17 * * 1-5", 63 + 5 / 60),  # dense: the weekend is found around midnights
        ("* * * 2 *", (utc(2026, 2, 1) - utc(2025, 2, 28, 23, 59)).total_seconds() / 3600),
        ("0 0 1 1 *", 366 * 24),  # 2028 is a leap year
    ],
)
def test_longest_interval_between_consecutive_slots(expr: str, hours: float) -> None:
    assert Schedule.parse(expr).longest_interval_s() == pytest.approx(hours * 3600)


@pytest.mark.parametrize("tz", ["America/New_York", "Europe/Lisbon", "UTC"])
@pytest.mark.parametrize(
    "expr", ["30 2 * * *", "30 1 * * *", "0 1,2,3 * * *", "0 * * * *", "*/20 * * * *"]
)
def test_prev_before_of_any_instant_is_the_same_in_any_order(expr: str, tz: str) -> None:
    """A manual trigger asks for the slot before its own instant: answers are kept per window
    between two slots, and must be those of a fresh walk, across both DST changes."""
    schedule = Schedule.parse(expr, tz)
    walk = schedule_module._prev_before.__wrapped__  # croniter's walk, nothing kept
    instants = [
        start + timedelta(minutes=23 * i)
        for start in (
            utc(2026, 3, 7, 20),
            utc(2026, 3, 28, 20),
            utc(2026, 10, 24, 20),
            utc(2026, 10, 31, 20),
        )
        for i in range(2 * 24 * 60 // 23)
    ]
    for t in [*instants, *random.Random(7).sample(instants, len(instants))]:
        assert schedule.prev_before(t) == walk(schedule, t), t
