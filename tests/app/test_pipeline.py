"""End to end on real servers: tick or trigger → fetch → raw payload → write → rows."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import nats
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daemon.app import open_daemon
from daemon.platform.clock import ManualClock
from tests._collect import run_status, source
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI
from tests.fix_otlp import spans_of_run

pytestmark = pytest.mark.anyio

SLOT = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


def rows(db: psycopg.Connection[Any], sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return db.execute(sql, params).fetchall()


async def test_scheduled_run_lands_rows_with_its_window(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/rates/2026-11-27", json={"base": "EUR", "rates": {"USD": 1.05}})
    settings = make_settings(
        [
            {
                "name": "rates",
                "url": api.url("/rates/{interval_start:%Y-%m-%d}"),
                "params": {"day": "{scheduled_for:%Y-%m-%d}"},
                "schedule": "0 6 * * *",
            }
        ]
    )
    clock = ManualClock(SLOT - timedelta(seconds=1))
    async with open_daemon(settings, clock=clock):
        clock.set(SLOT)
        await wait_for(lambda: run_status(db_conn, "rates@20261128T060000Z") == "stored")

    (hit,) = api.hits("/rates/2026-11-27")
    assert hit.query == {"day": ["2026-11-28"]}
    (row,) = rows(
        db_conn,
        "SELECT run_id, source, page, data, body, status, scheduled_for FROM collected_data",
    )
    assert row == (
        "rates@20261128T060000Z",
        "rates",
        0,
        {"base": "EUR", "rates": {"USD": 1.05}},
        None,
        "pending",
        SLOT,
    )
    (run,) = rows(
        db_conn,
        "SELECT trigger, status, attempts, pages, rows, http_status, error, trace_id"
        " FROM collection_runs",
    )
    assert run[:7] == ("schedule", "stored", 1, 1, 1, 200, None)
    assert run[7]
    assert len(run[7]) == 32


async def test_manual_trigger_over_nats_lands_rows(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    api.route("/now", json=[1, 2, 3])
    settings = make_settings([source(api, "now", "/now")])
    async with open_daemon(settings):
        msg = await request_reply("trigger", {"source": "now"})
        reply = msgspec.json.decode(msg.data)
        assert set(reply) == {"run_id", "source", "scheduled_for"}
        assert reply["source"] == "now"
        await wait_for(lambda: run_status(db_conn, reply["run_id"]) == "stored")
        # A bare source name is a trigger request too.
        bare = msgspec.json.decode((await request_reply("trigger", b"now")).data)
        assert bare["run_id"] != reply["run_id"]
        await wait_for(lambda: run_status(db_conn, bare["run_id"]) == "stored")

    data = rows(db_conn, "SELECT data FROM collected_data ORDER BY id")
    assert data == [([1, 2, 3],), ([1, 2, 3],)]
    triggers = rows(db_conn, "SELECT DISTINCT trigger FROM collection_runs")
    assert triggers == [("manual",)]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/csv", b"day,rate\n2026-11-27,1.05\n"),
        ("application/json", b'{"truncated": '),  # says JSON, is not
        ("application/json", b'{"nul": "a\\u0000b"}'),  # JSON that jsonb cannot hold
        ("application/octet-stream", bytes(range(256))),
        ("application/json", b'{"bad": "\\ud800"}'),  # lone surrogate
        ("application/json", b'{"n": 1e999999}'),  # valid JSON, a number jsonb cannot hold
        ("application/json", b'{"n": 1.5e-20000}'),
    ],
)
async def test_bodies_that_are_not_storable_json_land_in_body_unaltered(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    content_type: str,
    body: bytes,
) -> None:
    api.route("/odd", body=body, content_type=content_type)
    settings = make_settings([source(api, "odd", "/odd")])
    async with open_daemon(settings):
        reply = msgspec.json.decode((await request_reply("trigger", b"odd")).data)
        await wait_for(lambda: run_status(db_conn, reply["run_id"]) == "stored")
    (row,) = rows(db_conn, "SELECT data, body, content_type FROM collected_data")
    assert row == (None, body, content_type)


async def test_replayed_payload_inserts_nothing_twice(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
) -> None:
    api.route("/once", json={"n": 1})
    settings = make_settings([source(api, "once", "/once")])
    async with open_daemon(settings) as daemon:
        reply = msgspec.json.decode((await request_reply("trigger", b"once")).data)
        await wait_for(lambda: run_status(db_conn, reply["run_id"]) == "stored")
        subjects = daemon.bus.subjects
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(subjects.raw_stream)
            replayed = 0
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                original = await js.get_msg(subjects.raw_stream, seq)
                headers = dict(original.headers or {})
                headers["Nats-Msg-Id"] = f"replay-{seq}"  # defeat de-duplication on purpose
                assert original.subject is not None
                ack = await js.publish(original.subject, original.data or b"", headers=headers)
                assert not ack.duplicate
                replayed += 1
            assert replayed >= 1  # the page (a quick run publishes no "started" event)
            with anyio.fail_after(15):
                while True:  # until the writer has consumed and acked the replay
                    consumer = await js.consumer_info(subjects.raw_stream, subjects.writer_consumer)
                    if consumer.num_pending == 0 and consumer.num_ack_pending == 0:
                        break
                    await anyio.sleep(0.05)
            assert consumer.delivered.stream_seq == info.state.last_seq + replayed
        finally:
            await nc.close()
    assert rows(db_conn, "SELECT count(*) FROM collected_data") == [(1,)]
    assert rows(db_conn, "SELECT status, pages, rows FROM collection_runs") == [("stored", 1, 1)]


async def test_two_tickers_publishing_the_same_slot_make_one_run(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/daily", json={"ok": True})
    settings = make_settings([{"name": "daily", "url": api.url("/daily"), "schedule": "0 6 * * *"}])
    first, second = (
        ManualClock(SLOT - timedelta(seconds=1)),
        ManualClock(SLOT - timedelta(seconds=1)),
    )
    async with open_daemon(settings, clock=first) as a, open_daemon(settings, clock=second) as b:
        first.set(SLOT)
        second.set(SLOT + timedelta(milliseconds=50))
        await wait_for(lambda: a.ticker.ticks == 1 and b.ticker.ticks == 1, what="both ticks")
        await wait_for(lambda: run_status(db_conn, "daily@20261128T060000Z") == "stored")
    assert len(api.hits("/daily")) == 1
    assert rows(db_conn, "SELECT count(*) FROM collected_data") == [(1,)]
    assert rows(db_conn, "SELECT run_id FROM collection_runs") == [("daily@20261128T060000Z",)]


async def test_one_trace_connects_every_hop(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    spans: InMemorySpanExporter,
    bus_prefix: str,
) -> None:
    api.route("/traced", json={"t": 1})
    settings = make_settings([source(api, "traced", "/traced")])
    async with open_daemon(settings):
        reply = msgspec.json.decode((await request_reply("trigger", b"traced")).data)
        run_id = reply["run_id"]
        await wait_for(lambda: run_status(db_conn, run_id) == "stored")

        def run_spans() -> list[ReadableSpan]:
            found = spans_of_run(spans, run_id)
            names = {s.name for s in found}
            return found if f"process {bus_prefix}.raw.traced" in names else []

        found = await wait_for(run_spans, what="the writer's span")

    by_name: dict[str, list[ReadableSpan]] = {}
    for span in found:
        by_name.setdefault(span.name, []).append(span)
    collect, raw = f"{bus_prefix}.collect.traced", f"{bus_prefix}.raw.traced"
    for name in ("manual traced", f"send {collect}", f"process {collect}", "GET", f"process {raw}"):
        assert name in by_name, f"missing span {name!r}; have {sorted(by_name)}"
    trace_ids = {span.context.trace_id for span in found}
    assert len(trace_ids) == 1, "every hop of the run is in one trace"

    def parent_of(name: str) -> int | None:
        span = by_name[name][0]
        return span.parent.span_id if span.parent else None

    # One span per hop: the trigger (its root and the command's send), the fetch (with its
    # request), the write. The page carries the fetch's context: no span of its own.
    root = by_name["manual traced"][0]
    assert root.parent is None
    assert parent_of(f"send {collect}") == root.context.span_id
    command_sent = by_name[f"send {collect}"][0].context.span_id
    (fetched,) = by_name[f"process {collect}"]
    assert (fetched.attributes or {}).get("messaging.consumer.group.name") == "fetcher"
    assert fetched.parent
    assert fetched.parent.span_id == command_sent
    assert parent_of("GET") == fetched.context.span_id
    assert f"send {raw}" not in by_name
    written = by_name[f"process {raw}"]
    assert len(written) == 1  # the page: a quick run publishes no "started" event
    assert all(s.parent and s.parent.span_id == fetched.context.span_id for s in written)
    # The queued record is written in a batch whose span links to the command.
    recorded = [
        s
        for s in spans.get_finished_spans()
        if s.name == "write runs" and any(link.context.span_id == command_sent for link in s.links)
    ]
    assert recorded, "the runs consumer's batch links to the command"
    (stored_trace,) = rows(
        db_conn, "SELECT trace_id FROM collection_runs WHERE run_id = %s", run_id
    )
    assert stored_trace == (f"{next(iter(trace_ids)):032x}",)
    (get,) = by_name["GET"]
    assert get.kind.name == "CLIENT"
    assert (get.attributes or {}).get("http.response.status_code") == 200
    send = by_name[f"send {collect}"][0]
    assert (send.attributes or {}).get("messaging.system") == "nats"
    assert (send.attributes or {}).get("messaging.destination.name") == collect


def _times(db: psycopg.Connection[Any], run_id: str) -> tuple[Any, ...] | None:
    return db.execute(
        "SELECT status, attempts, queued_at, started_at, finished_at FROM collection_runs"
        " WHERE run_id = %s",
        (run_id,),
    ).fetchone()


async def test_a_slow_run_shows_fetching_and_a_quick_one_has_every_time_recorded(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    """A quick run publishes no "started" event (its page carries its times); one still
    fetching after a second is reported, so ``coleta runs`` shows it ``fetching``."""
    held = threading.Event()  # the slow run answers once the test has seen it fetching
    api.route("/slow", json={"slow": True}, gate=held)
    api.route("/quick", json={"quick": True})
    settings = make_settings([source(api, "slow", "/slow"), source(api, "quick", "/quick")])
    async with open_daemon(settings):
        slow = msgspec.json.decode((await request_reply("trigger", b"slow")).data)["run_id"]

        def fetching() -> tuple[Any, ...] | None:
            row = _times(db_conn, slow)
            return row if row and row[0] == "fetching" else None

        status, attempts, queued_at, started_at, finished_at = await wait_for(
            fetching, what="the slow run shown fetching"
        )
        assert (attempts, finished_at) == (1, None)
        assert queued_at <= started_at
        quick = msgspec.json.decode((await request_reply("trigger", b"quick")).data)["run_id"]
        await wait_for(lambda: run_status(db_conn, quick) == "stored", what="the quick run")
        held.set()
        await wait_for(lambda: run_status(db_conn, slow) == "stored", what="the slow run")
    for run_id in (slow, quick):
        status, attempts, queued_at, started_at, finished_at = _times(db_conn, run_id) or ()
        assert (status, attempts) == ("stored", 1)
        assert queued_at <= started_at <= finished_at
