"""Start-up catch-up: slots missed while no daemon ran are run again or recorded as missed.

History is made by the real daemon on a ManualClock: an hourly source runs its 01:00 slot, the
daemon stops, and a new one starts at 05:30, so 02:00-05:00 were missed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

from contracts import RunsReply, StatusReply
from daemon.app import Daemon, open_daemon
from daemon.platform.clock import ManualClock
from daemon.settings import Settings, SourceConfig
from daemon.ticker._catchup import CATCHUP_LIMIT, plan_catchup
from tests._collect import source_config
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

DAY = datetime(2026, 11, 28, tzinfo=UTC)
RESTART = DAY.replace(hour=5, minute=30)


def at(hour: int) -> datetime:
    return DAY.replace(hour=hour)


def hourly(api: LocalAPI, **extra: Any) -> dict[str, Any]:
    """An hourly source that tells the API which hour it collects."""
    return {
        "name": "hourly",
        "url": api.url("/hourly"),
        "params": {"h": "{scheduled_for:%H}"},
        "schedule": "0 * * * *",
        **extra,
    }


def runs(db: psycopg.Connection[Any], source: str = "hourly") -> dict[int, tuple[str, str]]:
    """``{hour: (trigger, status)}`` of the source's recorded runs."""
    found = db.execute(
        "SELECT scheduled_for, trigger, status FROM collection_runs WHERE source = %s", (source,)
    ).fetchall()
    return {slot.astimezone(UTC).hour: (trigger, status) for slot, trigger, status in found}


def hours_fetched(api: LocalAPI) -> list[str]:
    return [hit.query["h"][0] for hit in api.hits("/hourly")]


HISTORY = {1: ("schedule", "stored")}


async def record_history(settings: Settings, db: psycopg.Connection[Any]) -> None:
    """The 01:00 slot runs and is stored; then the daemon stops."""
    clock = ManualClock(at(1) - timedelta(seconds=1))
    async with open_daemon(settings, clock=clock) as daemon:
        await wait_for(daemon.ticker.caught_up.is_set, what="catch-up of a fresh database")
        assert daemon.ticker.catchup["hourly"].last_recorded is None
        clock.set(at(1))
        await wait_for(lambda: runs(db) == HISTORY, what="the 01:00 run")


async def caught_up(daemon: Daemon) -> None:
    await wait_for(daemon.ticker.caught_up.is_set, what="catch-up")


async def test_latest_runs_the_newest_missed_slot_and_records_the_rest_as_missed(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/hourly", json={"ok": True})
    settings = make_settings([hourly(api, catchup="latest")])
    await record_history(settings, db_conn)

    async with open_daemon(settings, clock=ManualClock(RESTART)) as daemon:
        await caught_up(daemon)
        missed = ("schedule", "missed")
        expected = HISTORY | {2: missed, 3: missed, 4: missed, 5: ("catchup", "stored")}
        await wait_for(lambda: runs(db_conn) == expected, what="catch-up runs")
        plan = daemon.ticker.catchup["hourly"]
        assert (plan.run, plan.missed, plan.skipped) == ((at(5),), (at(2), at(3), at(4)), 0)
        assert daemon.ticker.next_runs() == {"hourly": at(6)}

    assert hours_fetched(api) == ["01", "05"]
    stored = db_conn.execute("SELECT run_id FROM collected_data ORDER BY id").fetchall()
    assert stored == [("hourly@20261128T010000Z",), ("hourly@20261128T050000Z",)]
    gap = db_conn.execute(
        "SELECT run_id, attempts, error_code, error IS NOT NULL FROM collection_runs"
        " WHERE status = 'missed' ORDER BY scheduled_for"
    ).fetchall()
    assert gap == [(f"hourly@20261128T0{h}0000Z", 0, "missed", True) for h in (2, 3, 4)]


async def test_all_runs_every_missed_slot_oldest_first_then_ticks_normally(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/hourly", json={"ok": True})
    # One fetch at a time, so the API sees the runs in the order they were queued.
    settings = make_settings([hourly(api, catchup="all")], max_concurrent_fetches=1)
    await record_history(settings, db_conn)

    clock = ManualClock(RESTART)
    async with open_daemon(settings, clock=clock) as daemon:
        await caught_up(daemon)
        expected = HISTORY | {h: ("catchup", "stored") for h in (2, 3, 4, 5)}
        await wait_for(lambda: runs(db_conn) == expected, what="catch-up runs")
        assert hours_fetched(api) == ["01", "02", "03", "04", "05"]
        # 06:00 is the ticker's slot, not catch-up's: it runs once, as a scheduled run.
        clock.set(at(6))
        await wait_for(lambda: runs(db_conn).get(6) == ("schedule", "stored"), what="06:00")
        assert daemon.ticker.ticks == 1

    assert hours_fetched(api) == ["01", "02", "03", "04", "05", "06"]
    assert db_conn.execute("SELECT count(*) FROM collected_data").fetchone() == (6,)


async def test_none_records_every_missed_slot_and_the_service_shows_them(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    api.route("/hourly", json={"ok": True})
    settings = make_settings([hourly(api, catchup="none")])
    await record_history(settings, db_conn)

    async with open_daemon(settings, clock=ManualClock(RESTART)) as daemon:
        await caught_up(daemon)
        expected = HISTORY | {h: ("schedule", "missed") for h in (2, 3, 4, 5)}
        await wait_for(lambda: runs(db_conn) == expected, what="missed runs")

        reply = await request_reply("runs", {"source": "hourly"})
        listed = msgspec.json.decode(reply.data, type=RunsReply).runs
        by_hour = {run.scheduled_for.hour: run.status for run in listed}
        assert by_hour == {1: "stored", 2: "missed", 3: "missed", 4: "missed", 5: "missed"}
        assert all(run.error for run in listed if run.status == "missed")

        status = msgspec.json.decode((await request_reply("status")).data, type=StatusReply)
        (source,) = status.sources
        assert source.last_run is not None
        assert (source.last_run.status, source.last_run.scheduled_for) == ("missed", at(5))
        assert source.consecutive_failures == 0

    assert hours_fetched(api) == ["01"]
    assert db_conn.execute("SELECT count(*) FROM collected_data").fetchone() == (1,)


async def test_window_limits_how_far_back_catch_up_looks(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/hourly", json={"ok": True})
    settings = make_settings(
        [hourly(api, catchup="all", catchup_window="2h")], max_concurrent_fetches=1
    )
    await record_history(settings, db_conn)

    async with open_daemon(settings, clock=ManualClock(RESTART)) as daemon:
        await caught_up(daemon)
        # (03:30, 05:30]: 02:00 and 03:00 are outside, neither run nor recorded.
        expected = HISTORY | {4: ("catchup", "stored"), 5: ("catchup", "stored")}
        await wait_for(lambda: runs(db_conn) == expected, what="catch-up runs")

    assert hours_fetched(api) == ["01", "04", "05"]


async def test_a_source_never_run_catches_up_nothing(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/hourly", json={"ok": True})
    api.route("/fresh", json={"new": True})
    await record_history(make_settings([hourly(api, catchup="all")]), db_conn)
    fresh = {"name": "fresh", "url": api.url("/fresh"), "schedule": "0 * * * *", "catchup": "all"}
    settings = make_settings([hourly(api, catchup="all"), fresh])

    async with open_daemon(settings, clock=ManualClock(RESTART)) as daemon:
        await caught_up(daemon)
        await wait_for(lambda: len(runs(db_conn)) == 5, what="hourly's catch-up runs")
        plan = daemon.ticker.catchup["fresh"]
        assert (plan.run, plan.missed, plan.last_recorded) == ((), (), None)

    assert api.hits("/fresh") == []
    assert runs(db_conn, "fresh") == {}


async def test_restarting_again_queues_nothing_new(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/hourly", json={"ok": True})
    settings = make_settings([hourly(api, catchup="latest")])
    await record_history(settings, db_conn)
    async with open_daemon(settings, clock=ManualClock(RESTART)) as daemon:
        await caught_up(daemon)
        await wait_for(lambda: runs(db_conn).get(5) == ("catchup", "stored"), what="05:00")
        await wait_for(lambda: len(runs(db_conn)) == 5, what="the missed runs")
    before = runs(db_conn)

    async with open_daemon(settings, clock=ManualClock(RESTART)) as daemon:
        await caught_up(daemon)
        plan = daemon.ticker.catchup["hourly"]
        assert (plan.run, plan.missed, plan.last_recorded) == ((), (), at(5))

    assert runs(db_conn) == before
    assert hours_fetched(api) == ["01", "05"]


@pytest.fixture
def runs_locked(database_url: str, db_schema: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection able to hold writes to ``collection_runs`` back (reads go on)."""
    with psycopg.connect(database_url) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(db_schema)))
        conn.commit()
        yield conn


@pytest.mark.parametrize(("mode", "queued", "missed"), [("latest", 1, 3), ("all", 4, 0)])
async def test_two_daemons_starting_together_make_one_run_per_slot(
    api: LocalAPI,
    make_settings: MakeSettings,
    db_conn: psycopg.Connection[Any],
    runs_locked: psycopg.Connection[Any],
    mode: str,
    queued: int,
    missed: int,
) -> None:
    api.route("/hourly", json={"ok": True})
    settings = make_settings([hourly(api, catchup=mode)])
    await record_history(settings, db_conn)

    # Hold the writer back until both daemons have read the history and published: each
    # then sees the same gap and publishes the same catch-up, as replicas starting together do.
    runs_locked.execute("LOCK TABLE collection_runs IN EXCLUSIVE MODE")
    async with (
        open_daemon(settings, clock=ManualClock(RESTART)) as a,
        open_daemon(settings, clock=ManualClock(RESTART)) as b,
    ):
        await caught_up(a)
        await caught_up(b)
        runs_locked.commit()
        for daemon in (a, b):
            plan = daemon.ticker.catchup["hourly"]
            assert (len(plan.run), len(plan.missed)) == (queued, missed)
        await wait_for(lambda: len(runs(db_conn)) == 5, what="one record per slot")
        await wait_for(
            lambda: [s for _, s in runs(db_conn).values()].count("stored") == 1 + queued,
            what="the catch-up runs stored",
        )
        subjects, js = a.bus.subjects, a.bus.js
        info = await js.stream_info(subjects.collect_stream)
        published = []  # the message ids of the commands: a run id, or the return of one set aside
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            published.append((await js.get_msg(subjects.collect_stream, seq)).headers or {})
        events = (await js.stream_info(subjects.raw_stream)).state.messages

    # History + one command per caught-up slot (commands of the busy source set aside and
    # brought back are published again under another message id).
    originals = [h["Nats-Msg-Id"] for h in published if "defer" not in h["Nats-Msg-Id"]]
    assert len(originals) == 1 + queued
    # A page per run (and a "started" event before it if the run took over a second), one
    # event per missed slot.
    assert (1 + queued) + missed <= events <= 2 * (1 + queued) + missed
    assert len(hours_fetched(api)) == 1 + queued
    assert db_conn.execute("SELECT count(*) FROM collected_data").fetchone() == (1 + queued,)


# -- planning, without servers ---------------------------------------------------------------


def source(schedule: str = "0 * * * *", **extra: Any) -> SourceConfig:
    return source_config("http://127.0.0.1", "s", "/", schedule=schedule, **extra)


def test_plan_includes_a_slot_at_the_start_time_and_excludes_the_last_recorded_one() -> None:
    plan = plan_catchup(source(catchup="all"), at(3), at(5))
    assert plan.run == (at(4), at(5))
    # The ticker starts from the slot after the start time: no slot is in both.
    assert source().cron.next_after(at(5)) == at(6)


def test_plan_window_is_open_at_its_start() -> None:
    plan = plan_catchup(source(catchup="all", catchup_window="3h"), at(0), at(5))
    assert plan.run == (at(3), at(4), at(5))  # 02:00 is exactly 3 h back: outside


def test_plan_caps_slots_per_source_and_counts_the_rest() -> None:
    every_second = source("* * * * * *", catchup="all", catchup_window="7d")
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    plan = plan_catchup(every_second, now - timedelta(days=30), now)
    assert len(plan.run) == CATCHUP_LIMIT
    assert plan.run[0] == now - timedelta(seconds=CATCHUP_LIMIT - 1)
    assert plan.run[-1] == now
    assert plan.skipped == 7 * 24 * 3600 - CATCHUP_LIMIT

    latest = plan_catchup(source("* * * * * *", catchup="latest"), now - timedelta(days=1), now)
    assert (len(latest.run), len(latest.missed)) == (1, CATCHUP_LIMIT - 1)


def test_plan_follows_the_dst_rules_of_the_schedule() -> None:
    # 01:30 New York happens twice on 2026-11-01; the daily run fires once, at the first.
    daily = source("30 1 * * *", timezone="America/New_York", catchup="none")
    plan = plan_catchup(
        daily, datetime(2026, 10, 30, 6, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)
    )
    assert plan.missed == (
        datetime(2026, 10, 31, 5, 30, tzinfo=UTC),
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),  # EDT, the first 01:30
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC),
    )
    assert plan.steps() == [(slot, False) for slot in plan.missed]


async def test_ticking_does_not_wait_for_catch_up(
    api: LocalAPI,
    make_settings: MakeSettings,
    db_conn: psycopg.Connection[Any],
    runs_locked: psycopg.Connection[Any],
) -> None:
    api.route("/hourly", json={"ok": True})
    settings = make_settings([hourly(api, catchup="latest")])
    await record_history(settings, db_conn)

    runs_locked.execute("LOCK TABLE collection_runs IN ACCESS EXCLUSIVE MODE")  # no reads either
    clock = ManualClock(RESTART)
    async with open_daemon(settings, clock=clock) as daemon:
        clock.set(at(6))
        await wait_for(lambda: daemon.ticker.ticks == 1, what="the 06:00 tick")
        assert not daemon.ticker.caught_up.is_set()
        runs_locked.commit()
        await caught_up(daemon)
        missed = ("schedule", "missed")
        expected = HISTORY | {2: missed, 3: missed, 4: missed, 5: ("catchup", "stored")}
        expected[6] = ("schedule", "stored")
        await wait_for(lambda: runs(db_conn) == expected, what="catch-up and the 06:00 run")


def test_an_hourly_schedule_catches_up_both_runs_of_the_repeated_autumn_hour() -> None:
    # Europe/Berlin 2026-10-25: 02:00 CEST (00:00Z) and 02:00 CET (01:00Z) are both slots.
    hourly = source("0 * * * *", timezone="Europe/Berlin", catchup="all")
    plan = plan_catchup(
        hourly, datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 3, tzinfo=UTC)
    )
    assert plan.run == (
        datetime(2026, 10, 24, 23, tzinfo=UTC),  # 01:00 CEST
        datetime(2026, 10, 25, 0, tzinfo=UTC),  # 02:00 CEST
        datetime(2026, 10, 25, 1, tzinfo=UTC),  # 02:00 CET
        datetime(2026, 10, 25, 2, tzinfo=UTC),  # 03:00 CET
        datetime(2026, 10, 25, 3, tzinfo=UTC),
    )
    daily = source("30 2 * * *", timezone="Europe/Berlin", catchup="none")
    plan = plan_catchup(
        daily, datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 26, 3, tzinfo=UTC)
    )
    assert plan.missed == (  # 02:30 CEST only, then the next day's 02:30 CET
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    )
