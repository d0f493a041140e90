"""The one id scheme: run ids name slots, message ids name events, and both survive replays."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from contracts import CollectCommand
from daemon.ids import (
    backfill_number,
    backfill_run_id,
    event_id,
    manual_run_id,
    page_id,
    progress_key,
    replay_id,
    run_id_for,
)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def command(run_id: str = "rates@20260101T070000Z", replay: int = 0) -> CollectCommand:
    slot = utc(2026, 1, 1, 7)
    return CollectCommand(
        run_id=run_id, source="rates", scheduled_for=slot, requested_at=slot, replay=replay
    )


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


def test_a_manual_run_never_takes_its_slot_id() -> None:
    slot = utc(2026, 1, 1, 7)
    first, second = manual_run_id("rates", slot), manual_run_id("rates", slot)
    assert first != second
    assert re.fullmatch(r"rates@20260101T070000Z-manual-[0-9a-f]{6}", first)


def test_backfill_numbers_are_read_back_from_their_ids() -> None:
    slot = run_id_for("rates", utc(2026, 1, 1, 7))
    assert backfill_run_id(slot, 3) == "rates@20260101T070000Z-backfill-3"
    assert backfill_number(slot, backfill_run_id(slot, 3)) == 3
    assert backfill_number(slot, slot) is None
    assert backfill_number(slot, f"{slot}-manual-abc123") is None


def test_each_replay_of_a_run_has_ids_of_its_own() -> None:
    first, again = command(), command(replay=1)
    assert event_id(first, "failed") != event_id(again, "failed")
    assert page_id(first, 1, 0) == "rates@20260101T070000Z/r0/a1/p0"
    assert page_id(again, 1, 0) == "rates@20260101T070000Z/r1/a1/p0"
    assert replay_id(again) == "rates@20260101T070000Z/replay/1"


def test_a_progress_key_is_one_a_key_value_bucket_takes() -> None:
    key = progress_key(command("odd/source@20260101T070000Z-manual-x"))
    assert re.fullmatch(r"[-/_=.a-zA-Z0-9]+", key)
    assert key != progress_key(command("odd/source@20260101T070000Z-manual-x", replay=1))
