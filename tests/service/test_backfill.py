"""Backfill: ``coleta.backfill`` and ``coleta backfill`` queue one run per slot of a range."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio
import msgspec
import psycopg
import pytest

from daemon.app import open_daemon
from daemon.service._backfill import parse_range, plan_backfill, slots_between
from daemon.settings import SourceConfig
from tests._proc import clean_env, coleta
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI


def daily(tz: str = "UTC", schedule: str = "0 6 * * *") -> SourceConfig:
    return SourceConfig(name="rates", url="http://x", schedule=schedule, timezone=tz)


# -- the range and the plan (pure) ------------------------------------------------------------


def test_a_date_is_the_whole_day_in_the_sources_timezone() -> None:
    first, last = parse_range(daily("Europe/Lisbon"), "2026-07-01", "2026-07-02")
    assert first == datetime(2026, 6, 30, 23, 0, tzinfo=UTC)  # Lisbon is UTC+1 in summer
    assert last == datetime(2026, 7, 2, 23, 0, tzinfo=UTC) - timedelta(microseconds=1)
    slots = slots_between(daily("Europe/Lisbon"), first, last)
    assert slots == [datetime(2026, 7, 1, 5, tzinfo=UTC), datetime(2026, 7, 2, 5, tzinfo=UTC)]


def test_datetimes_bound_the_range_inclusively() -> None:
    source = daily(schedule="0 * * * *")
    first, last = parse_range(source, "2026-01-01T10:00:00Z", "2026-01-01T12:00")
    assert slots_between(source, first, last) == [
        datetime(2026, 1, 1, hour, tzinfo=UTC) for hour in (10, 11, 12)
    ]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-01-02", "2026-01-01", "end: '2026-01-01' is before start '2026-01-02'"),
        ("2026-02-30", "2026-03-01", "start: '2026-02-30' is not a date (YYYY-MM-DD)"),
        ("yesterday", "2026-03-01", "start: 'yesterday' is not a date"),
        ("2026-01-01", "soon", "end: 'soon' is not a date"),
    ],
)
def test_bad_ranges_are_refused_naming_the_bound(start: str, end: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_range(daily(), start, end)


def test_more_than_ten_thousand_slots_is_refused() -> None:
    source = daily(schedule="* * * * *")  # 1440 a day
    first, last = parse_range(source, "2026-01-01", "2026-01-06")
    assert len(slots_between(source, first, last)) == 6 * 1440
    first, last = parse_range(source, "2026-01-01", "2026-01-07")
    with pytest.raises(ValueError, match="more than 10000 slots of '\\* \\* \\* \\* \\*'; split"):
        slots_between(source, first, last)


def test_the_plan_skips_done_slots_and_gives_forced_or_failed_ones_fresh_ids() -> None:
    source = daily()
    slots = [datetime(2026, 1, day, 6, tzinfo=UTC) for day in (1, 2, 3, 4, 5)]
    ids = [f"rates@202601{day:02d}T060000Z" for day in (1, 2, 3, 4, 5)]
    recorded = [
        (slots[0], ids[0], "stored"),
        (slots[1], ids[1], "failed"),
        (slots[2], ids[2], "missed"),
        (slots[3], ids[3], "stored"),
        (slots[3], f"{ids[3]}-backfill-1", "stored"),
    ]
    first, last = slots[0], slots[-1]
    plan = plan_backfill(source, slots, recorded, first=first, last=last)
    assert plan.skipped == [(slots[0], ids[0]), (slots[3], ids[3])]
    assert plan.run == [
        (slots[1], f"{ids[1]}-backfill-1"),  # its own id is taken within the dedup window
        (slots[2], ids[2]),  # a missed slot's own id was never published
        (slots[4], ids[4]),
    ]
    forced = plan_backfill(source, slots, recorded, first=first, last=last, force=True)
    assert forced.skipped == []
    assert [run_id for _, run_id in forced.run] == [
        f"{ids[0]}-backfill-1",
        f"{ids[1]}-backfill-1",
        ids[2],
        f"{ids[3]}-backfill-2",
        ids[4],
    ]


# -- the service --------------------------------------------------------------------------------


def runs(db: psycopg.Connection[Any]) -> list[tuple[str, str, datetime, str]]:
    return db.execute(
        "SELECT run_id, trigger, scheduled_for, status FROM collection_runs ORDER BY run_id"
    ).fetchall()


def all_done(db: psycopg.Connection[Any], n: int) -> bool:
    found = runs(db)
    return len(found) == n and all(row[3] in ("stored", "failed") for row in found)


def day_source(api: LocalAPI) -> dict[str, Any]:
    return {
        "name": "rates",
        "url": api.url("/rates/{scheduled_for:%Y-%m-%d}"),
        "schedule": "0 6 * * *",
        "timezone": "Europe/Lisbon",
        "retries": {"max_attempts": 1},
    }


async def backfill(request_reply: Requester, **body: Any) -> dict[str, Any]:
    msg = await request_reply("backfill", body)
    if msg.headers and "Nats-Service-Error" in msg.headers:
        error = msgspec.json.decode(msg.data)["error"]
        return {"status": msg.headers["Nats-Service-Error-Code"], "message": error["message"]}
    result: dict[str, Any] = msgspec.json.decode(msg.data)
    return result


@pytest.mark.anyio
async def test_backfill_queues_each_slot_oldest_first_then_skips_or_forces(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    for day in range(1, 5):
        api.route(f"/rates/2026-01-0{day}", json={"day": day})
    async with open_daemon(make_settings([day_source(api)])):
        first = await backfill(request_reply, source="rates", start="2026-01-01", end="2026-01-03")
        ids = [f"rates@202601{day:02d}T060000Z" for day in (1, 2, 3)]
        assert first == {
            "source": "rates",
            "start": "2026-01-01T00:00:00Z",
            "end": "2026-01-03T23:59:59.999999Z",
            "slots": 3,
            "queued": 3,
            "skipped": 0,
            "run_ids": ids,
            "skipped_run_ids": [],
        }
        await wait_for(lambda: all_done(db_conn, 3))
        assert [hit.path for hit in api.requests] == [f"/rates/2026-01-0{d}" for d in (1, 2, 3)]

        again = await backfill(request_reply, source="rates", start="2026-01-01", end="2026-01-04")
        assert (again["queued"], again["skipped"]) == (1, 3)
        assert again["run_ids"] == ["rates@20260104T060000Z"]
        assert again["skipped_run_ids"] == ids
        await wait_for(lambda: all_done(db_conn, 4))

        forced = await backfill(
            request_reply, source="rates", start="2026-01-02", end="2026-01-02", force=True
        )
        assert forced["run_ids"] == ["rates@20260102T060000Z-backfill-1"]
        await wait_for(lambda: all_done(db_conn, 5))
        progress = msgspec.json.decode(
            (await request_reply("backfill.progress", {"run_ids": [*ids, "nope@x"]})).data
        )
        assert progress == {"total": 4, "counts": {"stored": 3, "queued": 1}}

    assert {row[1] for row in runs(db_conn)} == {"backfill"}
    assert all(row[3] == "stored" for row in runs(db_conn))
    # The run is for its slot: scheduled_for is 06:00 Lisbon (UTC in winter).
    assert runs(db_conn)[0][2] == datetime(2026, 1, 1, 6, tzinfo=UTC)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"source": "nope", "start": "2026-01-01", "end": "2026-01-02"}, "404", "unknown source"),
        (
            {"source": "rates", "start": "2026-01-02", "end": "2026-01-01"},
            "400",
            "end: '2026-01-01' is before start '2026-01-02'",
        ),
        (
            {"source": "rates", "start": "2026-01-01", "end": "2026-13-01"},
            "400",
            "end: '2026-13-01' is not a date (YYYY-MM-DD) or an ISO 8601 datetime",
        ),
        (
            {"source": "rates", "start": "1990-01-01", "end": "2026-01-01"},
            "400",
            "the range holds more than 10000 slots",
        ),
        ({"source": "rates"}, "400", "invalid request: Object missing required field `start`"),
    ],
)
async def test_bad_backfill_requests_get_a_clear_error(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    body: dict[str, Any],
    code: str,
    message: str,
) -> None:
    async with open_daemon(make_settings([day_source(api)])):
        reply = await backfill(request_reply, **body)
    assert reply["status"] == code
    assert message in reply["message"]
    assert not api.requests


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_command_shows_progress_and_exits_1_when_a_run_failed(
    api: LocalAPI,
    make_settings: MakeSettings,
    nats_url: str,
    bus_prefix: str,
    db_conn: psycopg.Connection[Any],
) -> None:
    api.route("/rates/2026-01-01", json={"day": 1})
    api.route("/rates/2026-01-02", status=404, body="no data that day")
    api.route("/rates/2026-01-03", json={"day": 3})
    env = clean_env(NATS_URL=nats_url, COLETA_BUS_PREFIX=bus_prefix)
    async with open_daemon(make_settings([day_source(api)])):
        result = await anyio.to_thread.run_sync(
            partial(
                coleta, "backfill", "rates", "--from", "2026-01-01", "--to", "2026-01-03", env=env
            )
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.splitlines()
        assert lines[-1] == "[####################] 2/3 stored, 1 failed"
        assert all(re.fullmatch(r"\[#*\.*\] \d/3 stored, \d failed", line) for line in lines)
        assert result.stdout.splitlines() == [
            "backfill rates 2026-01-01 00:00 .. 2026-01-03 23:59 UTC: 3 slots, 3 queued,"
            " 0 skipped (already stored or running)",
            "2 stored, 1 failed, 0 skipped",
        ]

        # Again: the stored slots are skipped, the failed one gets a fresh run id and fails again.
        again = await anyio.to_thread.run_sync(
            partial(
                coleta, "backfill", "rates", "--from", "2026-01-01", "--to", "2026-01-03", env=env
            )
        )
        assert again.returncode == 1
        assert "3 slots, 1 queued, 2 skipped" in again.stdout
        assert again.stderr.splitlines()[-1] == "[####################] 0/1 stored, 1 failed"

        unknown = await anyio.to_thread.run_sync(
            partial(
                coleta, "backfill", "nope", "--from", "2026-01-01", "--to", "2026-01-03", env=env
            )
        )
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("coleta: unknown source 'nope'")
    assert ("rates@20260102T060000Z-backfill-1", "failed") in {(r[0], r[3]) for r in runs(db_conn)}


def test_a_backfill_of_the_autumn_day_runs_the_repeated_hour_of_an_hourly_schedule() -> None:
    hourly = daily("Europe/Berlin", "0 * * * *")
    first, last = parse_range(hourly, "2026-10-25", "2026-10-25")
    slots = slots_between(hourly, first, last)
    assert len(slots) == 25
    assert slots[2:4] == [
        datetime(2026, 10, 25, 0, tzinfo=UTC),
        datetime(2026, 10, 25, 1, tzinfo=UTC),
    ]
    plan = plan_backfill(hourly, slots, [], first=first, last=last)
    assert len({run_id for _, run_id in plan.run}) == 25
    assert len(slots_between(hourly, *parse_range(hourly, "2026-03-29", "2026-03-29"))) == 23
    # A daily schedule still runs once on both days.
    at_230 = daily("Europe/Berlin", "30 2 * * *")
    for day in ("2026-10-25", "2026-03-29"):
        assert len(slots_between(at_230, *parse_range(at_230, day, day))) == 1
