"""The writer's SQL as CLIENT spans under its batch span, in the run's own trace."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from daemon.app import open_daemon
from daemon.platform import tracing
from daemon.platform.spans import batch_span, db_span, producer_span
from tests._collect import source
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


class Boom(Exception):
    sqlstate = "23505"


def test_db_span_names_single_and_batch_statements(spans: InMemorySpanExporter) -> None:
    with db_span(
        "INSERT",
        "collected_data",
        namespace="coleta.public",
        server_address="db.example",
        server_port=5432,
    ):
        pass
    with db_span("INSERT", "collection_runs", batch_size=3):
        pass
    with pytest.raises(Boom), db_span("INSERT", "collection_runs"):
        raise Boom("duplicate key; see http://u:pw@db.example/?password=hunter2")

    (single,) = named(spans, "INSERT collected_data")
    assert single.kind is SpanKind.CLIENT
    assert dict(single.attributes or {}) == {
        "db.system.name": "postgresql",
        "db.operation.name": "INSERT",
        "db.collection.name": "collected_data",
        "db.query.summary": "INSERT collected_data",
        "db.namespace": "coleta.public",
        "server.address": "db.example",
        "server.port": 5432,
    }
    (batch,) = named(spans, "BATCH INSERT collection_runs")
    assert (batch.attributes or {})["db.operation.name"] == "BATCH INSERT"
    assert (batch.attributes or {})["db.operation.batch.size"] == 3
    (failed,) = named(spans, "INSERT collection_runs")
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["db.response.status_code"] == "23505"
    assert (failed.attributes or {})["error.type"] == "23505"
    assert "hunter2" not in failed.to_json()
    assert "pw@" not in failed.to_json()


def test_a_batch_of_one_trace_joins_it_and_a_mixed_one_does_not(
    spans: InMemorySpanExporter,
) -> None:
    carried: dict[str, list[dict[str, str]]] = {"r1": [], "r2": []}
    sent: dict[str, int] = {}
    for run in ("r1", "r2"):
        with tracing.tracer().start_as_current_span(f"run {run}"):
            for _ in range(2):
                with producer_span("raw.x", source="x", run_id=run) as span:
                    carried[run].append(tracing.inject())
                    sent.setdefault(run, span.get_span_context().span_id)
    with batch_span("write one", carried["r1"]):
        pass
    with batch_span("write mixed", carried["r1"] + carried["r2"]):
        pass

    (one,) = named(spans, "write one")
    (run1,) = named(spans, "run r1")
    assert one.context.trace_id == run1.context.trace_id
    assert one.parent is not None
    assert one.parent.span_id == sent["r1"]  # under the first message's producer span
    assert len(one.links) == 2
    (mixed,) = named(spans, "write mixed")
    assert mixed.parent is None
    assert len(mixed.links) == 4


@pytest.mark.anyio
async def test_a_runs_trace_goes_down_to_its_sql(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    spans: InMemorySpanExporter,
    db_schema: str,
    bus_prefix: str,
) -> None:
    api.route("/sql", json={"v": 1})
    settings = make_settings([source(api, "sql", "/sql")])
    async with open_daemon(settings):
        reply = msgspec.json.decode((await request_reply("trigger", b"sql")).data)
        run_id = reply["run_id"]

        def stored() -> bool:
            row = db_conn.execute(
                "SELECT status FROM collection_runs WHERE run_id = %s", (run_id,)
            ).fetchone()
            return row is not None and row[0] == "stored" and bool(named(spans, "write writer"))

        await wait_for(stored, what="the stored run and its write span")
    (stored_trace,) = db_conn.execute(
        "SELECT trace_id FROM collection_runs WHERE run_id = %s", (run_id,)
    ).fetchone() or ("",)
    dbname = db_conn.info.dbname

    (insert,) = named(spans, "INSERT collected_data")
    assert f"{insert.context.trace_id:032x}" == stored_trace
    assert insert.kind is SpanKind.CLIENT
    attributes = dict(insert.attributes or {})
    assert attributes["db.system.name"] == "postgresql"
    assert attributes["db.namespace"] == f"{dbname}.{db_schema}"
    assert attributes["db.collection.name"] == "collected_data"
    assert "db.operation.batch.size" not in attributes  # one row: not a batch operation
    by_id = {span.context.span_id: span for span in spans.get_finished_spans()}
    # INSERT → write writer (the batch) → process collect (the fetch, whose context the page
    # carries) → send collect → the trigger.
    chain = [insert.name]
    span = insert
    while span.parent is not None:
        span = by_id[span.parent.span_id]
        chain.append(span.name)
    assert chain == [
        "INSERT collected_data",
        "write writer",
        f"process {bus_prefix}.collect.sql",
        f"send {bus_prefix}.collect.sql",
        "manual sql",
    ]
    # The run's record is updated in the same trace, by one statement per batch.
    runs_sql = [
        span
        for span in spans.get_finished_spans()
        if span.name.endswith("INSERT collection_runs")
        and f"{span.context.trace_id:032x}" == stored_trace
    ]
    assert len(runs_sql) >= 2  # the queued command, and the events of the run
    assert all(
        span.parent and by_id[span.parent.span_id].name.startswith("write ") for span in runs_sql
    )
