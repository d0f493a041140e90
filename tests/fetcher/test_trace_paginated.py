"""One trace per run, also when the run has several pages and a retry."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daemon.app import open_daemon
from tests._collect import run_status
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI
from tests.fix_otlp import spans_of_run

pytestmark = pytest.mark.anyio


async def test_a_paginated_run_with_one_retry_is_one_connected_trace(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    spans: InMemorySpanExporter,
    bus_prefix: str,
) -> None:
    # Page 1 is fine, page 2 fails once with a 503 and then answers, page 3 is empty.
    api.route("/paged", json=[1, 2], times=1)
    api.route("/paged", status=503, body="busy", times=1)
    api.route("/paged", json=[3], times=1)
    api.route("/paged", json=[])
    source = {
        "name": "paged",
        "url": api.url("/paged"),
        "schedule": "0 0 1 1 *",
        "pagination": {"kind": "page"},
        "retries": {"max_attempts": 3, "max_backoff_s": 0.2},
    }
    async with open_daemon(make_settings([source])):
        reply = msgspec.json.decode((await request_reply("trigger", b"paged")).data)
        run_id = reply["run_id"]
        await wait_for(lambda: run_status(db_conn, run_id) == "stored")

        def run_spans() -> list[ReadableSpan]:
            found = spans_of_run(spans, run_id)
            written = [s for s in found if s.name == f"process {bus_prefix}.raw.paged"]
            # 3 pages (the first attempt's page 1 told the writer it started: no "started")
            return found if len(written) >= 3 else []

        found = await wait_for(run_spans, what="the writer's spans of every page")

    assert [q["page"] for q in (hit.query for hit in api.hits("/paged"))] == [
        ["1"],
        ["2"],
        ["2"],  # the retry resumes at the failed page, not at page 1
        ["3"],
    ]
    assert {s.context.trace_id for s in found} == {found[0].context.trace_id}, "one trace"
    collect, raw = f"{bus_prefix}.collect.paged", f"{bus_prefix}.raw.paged"
    (command_sent,) = [s for s in found if s.name == f"send {collect}"]
    attempts = [
        s
        for s in found
        if s.name == f"process {collect}"
        and (s.attributes or {}).get("messaging.consumer.group.name") == "fetcher"
    ]
    assert len(attempts) == 2, "the retry is its own consumer span"
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == command_sent.context.span_id
    gets = [s for s in found if s.kind.name == "CLIENT" and s.name.startswith("GET")]
    codes = sorted(int(str((s.attributes or {}).get("http.response.status_code"))) for s in gets)
    assert codes == [200, 200, 200, 503], "each page and the failed try are separate spans"
    attempt_ids = {a.context.span_id for a in attempts}
    for get in gets:
        assert get.parent is not None
        assert get.parent.span_id in attempt_ids
    # The pages carry their attempt's context: no span of their own, the write is its child.
    assert not [s for s in found if s.name == f"send {raw}"]
    writes = [s for s in found if s.name == f"process {raw}"]
    assert len(writes) == 3
    for write in writes:
        assert write.parent is not None
        assert write.parent.span_id in attempt_ids
    stored = db_conn.execute(
        "SELECT trace_id, pages FROM collection_runs WHERE run_id = %s", (run_id,)
    ).fetchone()
    assert stored == (f"{found[0].context.trace_id:032x}", 3)
