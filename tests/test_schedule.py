"""Schedule arithmetic: next fire times, previous slots, DST rules and run ids."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from daemon._schedule import Schedule, check_cron, run_id_for


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


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


def test_run_id_is_deterministic_utc() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    slot = utc(2026, 1, 1, 7)

    assert run_id_for("rates", slot) == "rates@20260101T070000Z"
    assert run_id_for("rates", slot.astimezone(berlin)) == "rates@20260101T070000Z"
    assert run_id_for("rates", slot, suffix="manual-1") == "rates@20260101T070000Z-manual-1"


def test_run_ids_distinct_with_microseconds() -> None:
    first = run_id_for("ticks", utc(2026, 1, 1, 7, 0, 0, 500))
    second = run_id_for("ticks", utc(2026, 1, 1, 7, 0, 0, 501))

    assert first == "ticks@20260101T070000.000500Z"
    assert second == "ticks@20260101T070000.000501Z"
    assert run_id_for("ticks", utc(2026, 1, 1, 7, 0, 1)) == "ticks@20260101T070001Z"


# -- invalid input


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "invalid cron expression '61 * * * *'"),
        ("a b c d e", "invalid cron expression 'a b c d e'"),
        ("*/0 * * * *", "invalid cron expression '*/0 * * * *'"),
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


def test_unknown_timezone() -> None:
    message = "unknown timezone 'Nowhere/City' (expected an IANA name like 'Europe/Lisbon')"

    with pytest.raises(ValueError, match=exactly(message)):
        Schedule.parse("0 7 * * *", "Nowhere/City")
