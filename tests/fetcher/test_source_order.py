"""A source's commands run in the order they were queued, even when some wait on the deferred
stream while the source is busy (a backfill goes oldest first)."""

from __future__ import annotations

import functools
import threading
from typing import Any

import msgspec
import nats
import psycopg
import pytest

from contracts import Subjects
from daemon.app import open_daemon
from tests._collect import finished, source, trigger
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_faults import eventually
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


def daily(api: LocalAPI) -> dict[str, Any]:
    return {
        "name": "rates",
        "url": api.url("/rates/{scheduled_for:%Y-%m-%d}"),
        "schedule": "0 6 * * *",
        "retries": {"max_attempts": 1},
    }


async def queue_day(request_reply: Requester, day: str) -> str:
    """Queue the run of one day's slot (a one-day backfill); its run id."""
    msg = await request_reply("backfill", {"source": "rates", "start": day, "end": day})
    reply = msgspec.json.decode(msg.data)
    assert reply["queued"] == 1, reply
    return str(reply["run_ids"][0])


async def deferred(nats_url: str, prefix: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(Subjects(prefix).defer_stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def test_a_command_taken_while_an_earlier_one_comes_back_waits_behind_it(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
    bus_prefix: str,
) -> None:
    """Day 2 waits aside while day 1 runs; day 3 is queued while both fetch slots are busy.
    When day 1 ends, day 2 goes back to the end of the collect stream, behind day 3: day 3,
    taken first, must not run before it."""
    day1, other = threading.Event(), threading.Event()
    api.route("/rates/2026-01-01", json={"day": 1}, gate=day1)
    api.route("/rates/2026-01-02", json={"day": 2})
    api.route("/rates/2026-01-03", json={"day": 3})
    api.route("/other", json={"other": True}, gate=other)
    settings = make_settings([daily(api), source(api, "other", "/other")], max_concurrent_fetches=2)
    try:
        async with open_daemon(settings):
            ids = [await queue_day(request_reply, "2026-01-01")]
            await wait_for(lambda: api.hits("/rates/2026-01-01"), what="day 1 fetching")
            ids.append(await queue_day(request_reply, "2026-01-02"))
            await eventually(
                lambda: deferred(nats_url, bus_prefix), until=lambda n: n == 1, what="day 2 aside"
            )
            await trigger(request_reply, "other")
            await wait_for(lambda: api.hits("/other"), what="the other source fetching")
            # Both fetch slots are busy: day 3 stays on the collect stream.
            ids.append(await queue_day(request_reply, "2026-01-03"))
            day1.set()
            for run_id in ids:
                row = await wait_for(functools.partial(finished, db_conn, run_id), what=run_id)
                assert row["status"] == "stored"
            other.set()
    finally:
        day1.set()
        other.set()
    fetched = [hit.path for hit in api.requests if hit.path.startswith("/rates/")]
    assert fetched == ["/rates/2026-01-01", "/rates/2026-01-02", "/rates/2026-01-03"]
    assert await deferred(nats_url, bus_prefix) == 0
