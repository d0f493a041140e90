"""Secrets in a source's configuration reach the API and nothing else: no span, log line,
metric, database row or message on the bus holds them, whether the run succeeds or fails."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import msgspec
import nats
import psycopg
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts import DeadLetter, RawPayload, RunEvent
from daemon import _logging, _metrics, _tracing
from daemon.app import open_daemon
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

PASSWORD = "s3cretpw"
QUERY_KEY = "SECRET_Q"
HEADER_TOKEN = "SECRET_H"
BODY_SECRET = "SECRET_B"
BASIC = base64.b64encode(f"user:{PASSWORD}".encode()).decode()  # what goes on the wire
SECRETS = (PASSWORD, QUERY_KEY, HEADER_TOKEN, BODY_SECRET, BASIC.rstrip("="))


@pytest.fixture
def captured() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader, io.StringIO]]:
    """Every span, metric and log line the daemon produces, at the most verbose level."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    _tracing.use_provider(provider)
    metrics = InMemoryMetricReader()
    _metrics.use_reader(metrics)
    logs = io.StringIO()
    _logging.setup_logging("DEBUG", stream=logs)
    yield spans, metrics, logs
    _logging._reset_for_tests()
    _metrics._reset_for_tests()
    _tracing._reset_for_tests()


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


async def bus_messages(nats_url: str, streams: list[str]) -> list[str]:
    """Every message kept on ``streams``: headers and body, with the bytes fields that
    JSON carries as base64 (a page's body, a dead letter's original) decoded."""
    run_event = msgspec.json.Decoder(RunEvent)
    dead_letter = msgspec.json.Decoder(DeadLetter)
    found: list[str] = []
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for stream in streams:
            info = await js.stream_info(stream)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                data = msg.data or b""
                found.append(f"{msg.subject} {msg.headers} {data.decode(errors='replace')}")
                if ".dlq." in (msg.subject or ""):
                    found.append(dead_letter.decode(data).original.decode(errors="replace"))
                elif ".raw." in (msg.subject or ""):
                    event = run_event.decode(data)
                    if isinstance(event, RawPayload):
                        found.append(event.body.decode(errors="replace"))
    finally:
        await nc.close()
    return found


async def test_no_secret_leaves_the_request(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
    captured: tuple[InMemorySpanExporter, InMemoryMetricReader, io.StringIO],
) -> None:
    spans, metrics, logs = captured
    basic_url = f"http://user:{PASSWORD}@127.0.0.1:{api.port}/basic"
    # The API echoes the URL it was called with, key and credentials included, in its error.
    api.route("/basic", json={"rates": [1, 2]}, times=1)
    api.route("/basic", status=401, body=f"bad credentials for {basic_url}?api_key={QUERY_KEY}")
    api.route("/bearer", status=403, body=f"denied: {api.url('/bearer')}?api_key={QUERY_KEY}&x=1")
    secret_request: dict[str, Any] = {
        "method": "POST",
        "params": {"api_key": QUERY_KEY},
        "headers": {"Authorization": f"Bearer {HEADER_TOKEN}"},
        "body": {"client_secret": BODY_SECRET, "q": "rates"},
        "schedule": "0 0 1 1 *",
        "retries": {"max_attempts": 1},
    }
    settings = make_settings(
        [
            {"name": "basic", "url": basic_url, **secret_request},
            {"name": "bearer", "url": api.url("/bearer"), **secret_request},
            # Nothing listens on port 1: the connection error path.
            {"name": "refused", "url": f"http://user:{PASSWORD}@127.0.0.1:1/x", **secret_request},
        ]
    )
    async with open_daemon(settings) as daemon:
        outcomes = {}
        for source in ("basic", "basic", "bearer", "refused"):
            reply = await request_reply("trigger", {"source": source})
            run_id = msgspec.json.decode(reply.data)["run_id"]

            def finished(run_id: str = run_id) -> str | None:
                row = db_conn.execute(
                    "SELECT status FROM collection_runs WHERE run_id = %s"
                    " AND status IN ('stored', 'failed')",
                    (run_id,),
                ).fetchone()
                return row[0] if row else None

            outcomes[run_id] = await wait_for(finished, what=f"the {source} run")
        subjects = daemon.bus.subjects
        # Every span is ended once the writer is done with the last run.
        await wait_for(
            lambda: sum(s.name.startswith("write ") for s in spans.get_finished_spans()) >= 2
        )

    # The secrets did reach the API (else this test would prove nothing) ...
    first, _second = api.hits("/basic")
    assert first.query == {"api_key": [QUERY_KEY]}
    assert first.headers["authorization"] == f"Basic {BASIC}"  # URL credentials win (httpx)
    assert BODY_SECRET in first.body.decode()
    (bearer,) = api.hits("/bearer")
    assert bearer.headers["authorization"] == f"Bearer {HEADER_TOKEN}"
    assert sorted(outcomes.values()) == ["failed", "failed", "failed", "stored"]

    # ... and nowhere else.
    finished_spans = spans.get_finished_spans()
    assert {"GET", "POST"} & {span.name for span in finished_spans}
    assert any(span.events for span in finished_spans)  # errors were recorded
    for span in finished_spans:
        assert not leaks(span.to_json()), span.to_json()

    lines = logs.getvalue().splitlines()
    assert any('"event":"fetch.failed"' in line for line in lines)
    assert [line for line in lines if leaks(line)] == []

    data = metrics.get_metrics_data()
    assert data is not None
    assert not leaks(data.to_json())

    runs = db_conn.execute("SELECT row_to_json(r)::text FROM collection_runs r").fetchall()
    rows = db_conn.execute("SELECT row_to_json(d)::text FROM collected_data d").fetchall()
    assert len(runs) == 4
    assert len(rows) == 1
    assert [text for (text,) in runs + rows if leaks(text)] == []
    errors = dict(
        db_conn.execute(
            "SELECT source, error FROM collection_runs WHERE error_code = 'http_status'"
        ).fetchall()
    )
    # The echo was kept, redacted: it says what went wrong without saying the secret.
    assert f"http://127.0.0.1:{api.port}/basic?api_key=REDACTED" in errors["basic"]
    assert "api_key=REDACTED&x=1" in errors["bearer"]

    messages = await bus_messages(
        nats_url, [subjects.collect_stream, subjects.raw_stream, subjects.dlq_stream]
    )
    assert sum(".dlq." in text for text in messages) >= 3
    assert [text for text in messages if leaks(text)] == []
