"""The metrics seam: instruments recorded where things happen, read through an in-memory reader."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import nats
import psycopg
import pytest
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)

from contracts import RawPayload, Subjects, encode
from daemon.app import open_daemon
from daemon.platform import meter, metrics, tracing
from daemon.platform.bus import Bus, BusOptions
from daemon.platform.clock import ManualClock
from daemon.writer import BATCH_BYTES
from tests._collect import source
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

DAY = datetime(2026, 11, 28, tzinfo=UTC)

Point = tuple[dict[str, Any], Any]


@pytest.fixture(autouse=True)
def _clean_metrics(no_otel_env: None) -> Iterator[None]:
    """No OTEL_* configuration, no provider of ours, before and after each test."""
    meter._reset_for_tests()
    yield
    meter._reset_for_tests()


def points(metrics_reader: InMemoryMetricReader, name: str, unit: str | None = None) -> list[Point]:
    """``(attributes, data point)`` of every stream of metric ``name`` (cumulative)."""
    data = metrics_reader.get_metrics_data()
    found: list[Point] = []
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name != name:
                    continue
                if unit is not None:
                    assert metric.unit == unit, (name, metric.unit)
                found.extend((dict(p.attributes or {}), p) for p in metric.data.data_points)
    return found


def totals(
    metrics_reader: InMemoryMetricReader, name: str, *keys: str
) -> dict[tuple[Any, ...], Any]:
    """Counter values (or histogram counts) of ``name``, keyed by the given attributes."""
    out: dict[tuple[Any, ...], Any] = {}
    for attributes, point in points(metrics_reader, name):
        key = tuple(attributes.get(k) for k in keys)
        value = point.count if isinstance(point, HistogramDataPoint) else point.value
        out[key] = out.get(key, 0) + value
    return out


# -- the seam ------------------------------------------------------------------------------
def test_instruments_have_stable_names_units_and_attributes(
    metrics_reader: InMemoryMetricReader,
) -> None:
    metrics.record_run("rates", "stored", trigger="schedule")
    metrics.record_run("rates", "failed", trigger="manual", error_type="http_status")
    metrics.record_http_request(
        "rates",
        method="GET",
        server_address="api.example",
        server_port=443,
        duration_s=0.2,
        status_code=200,
        body_bytes=1500,
    )
    metrics.record_http_request(
        "rates",
        method="GET",
        server_address="api.example",
        server_port=443,
        duration_s=0.1,
        status_code=503,
        error_type="http_status",
        body_bytes=20,
    )
    metrics.record_retry("rates", "http_status")
    metrics.record_dead_letter("rates", "poison", stage="writer")
    metrics.record_rows("rates", 3)
    metrics.record_rows("rates", 0)
    metrics.record_batch("writer", size=4, duration_s=0.03, outcome="committed")
    metrics.record_lateness("rates", 1.5, trigger="schedule")
    metrics.record_lateness("rates", -0.2, trigger="schedule")  # a clock's jitter: 0

    assert totals(
        metrics_reader, "coleta.runs", "coleta.source", "coleta.outcome", "error.type"
    ) == {
        ("rates", "stored", None): 1,
        ("rates", "failed", "http_status"): 1,
    }
    duration = points(metrics_reader, "http.client.request.duration", unit="s")
    assert sorted((a["http.response.status_code"], a.get("error.type")) for a, _ in duration) == [
        (200, None),
        (503, "503"),  # HTTP conventions: the status code is the error type
    ]
    ok = next(a for a, _ in duration if a["http.response.status_code"] == 200)
    assert ok == {
        "http.request.method": "GET",
        "server.address": "api.example",
        "server.port": 443,
        "http.response.status_code": 200,
        "coleta.source": "rates",
    }
    ((_, size),) = points(metrics_reader, "http.client.response.body.size", unit="By")
    assert (size.count, size.sum) == (1, 1500)  # only successful bodies
    assert totals(metrics_reader, "coleta.fetch.retries", "error.type") == {("http_status",): 1}
    assert totals(metrics_reader, "coleta.dead_letters", "error.type", "coleta.stage") == {
        ("poison", "writer"): 1
    }
    assert totals(metrics_reader, "coleta.writer.rows", "coleta.source") == {("rates",): 3}
    ((attributes, batch),) = points(metrics_reader, "coleta.writer.batch.size", unit="{message}")
    assert attributes == {"messaging.consumer.group.name": "writer", "coleta.outcome": "committed"}
    assert (batch.count, batch.sum) == (1, 4)
    ((_, took),) = points(metrics_reader, "coleta.writer.batch.duration", unit="s")
    assert took.sum == pytest.approx(0.03)
    ((_, late),) = points(metrics_reader, "coleta.schedule.lateness", unit="s")
    assert (late.count, late.sum, late.min) == (2, 1.5, 0.0)
    assert points(metrics_reader, "coleta.runs", unit="{run}")


def test_consumer_lag_gauge_reports_the_last_sample(metrics_reader: InMemoryMetricReader) -> None:
    metrics.set_consumer_lag("COLLECT", "fetcher", 7)
    metrics.set_consumer_lag("RAW", "writer", 0)
    lag = {
        (a["messaging.destination.name"], a["messaging.consumer.group.name"]): p.value
        for a, p in points(metrics_reader, "coleta.consumer.lag", unit="{message}")
    }
    assert lag == {("COLLECT", "fetcher"): 7, ("RAW", "writer"): 0}
    metrics.set_consumer_lag("COLLECT", "fetcher", None)  # could not be read: not reported
    assert [a["messaging.system"] for a, _ in points(metrics_reader, "coleta.consumer.lag")] == [
        "nats"
    ]


def test_recording_without_setup_or_reader_is_harmless() -> None:
    metrics.record_run("x", "stored")
    metrics.record_lateness("x", 1.0, trigger="schedule")
    found = InMemoryMetricReader()
    metrics.use_reader(found)  # a fresh provider: earlier measurements are not carried over
    metrics.record_run("x", "missed")
    assert totals(found, "coleta.runs", "coleta.outcome") == {("missed",): 1}


@pytest.fixture
def created_readers(monkeypatch: pytest.MonkeyPatch) -> list[MetricReader]:
    """Every periodic (exporting) reader setup_metrics builds."""
    created: list[MetricReader] = []
    original = PeriodicExportingMetricReader

    def spy(exporter: Any, *args: Any, **kwargs: Any) -> MetricReader:
        found = original(exporter, *args, **kwargs)
        created.append(found)
        return found

    monkeypatch.setattr(meter, "PeriodicExportingMetricReader", spy)
    return created


def test_no_endpoint_means_no_exporter(created_readers: list[MetricReader]) -> None:
    metrics.setup_metrics()
    metrics.setup_metrics()
    metrics.record_run("x", "stored")
    assert created_readers == []
    metrics.shutdown_metrics()
    metrics.shutdown_metrics()


def test_metrics_exporter_none_wins_over_endpoint(
    monkeypatch: pytest.MonkeyPatch, created_readers: list[MetricReader]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    metrics.setup_metrics()
    assert created_readers == []

    metrics.shutdown_metrics()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    metrics.setup_metrics()
    assert len(created_readers) == 1


def test_unknown_metrics_protocol_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:9/v1/metrics")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match=r"'http/json'.*grpc.*http/protobuf"):
        metrics.setup_metrics()


def test_setup_yields_to_use_reader(
    metrics_reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
    created_readers: list[MetricReader],
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    metrics.setup_metrics()
    metrics.record_retry("x", "timeout")
    assert created_readers == []
    assert totals(metrics_reader, "coleta.fetch.retries", "coleta.source") == {("x",): 1}


# -- the consumer lag sampler on a real bus --------------------------------------------------
@pytest.mark.anyio
async def test_lag_sampler_reads_each_durable_consumer(
    metrics_reader: InMemoryMetricReader, nats_url: str, bus_prefix: str
) -> None:
    subjects = Subjects(bus_prefix)
    options = BusOptions(max_age_s=600, duplicate_window_s=60)
    async with Bus.open(nats_url, subjects, options) as bus, anyio.create_task_group() as tg:
        for n in range(3):  # nobody consumes them: both consumers of the stream lag by 3
            await bus.js.publish(
                subjects.collect("lagging"), b"{}", headers={"Nats-Msg-Id": f"{n}"}
            )
        tg.start_soon(metrics.sample_consumer_lag, bus, name="lag")

        def lag() -> dict[tuple[str, str], int]:
            found = {
                (a["messaging.destination.name"], a["messaging.consumer.group.name"]): p.value
                for a, p in points(metrics_reader, "coleta.consumer.lag")
            }
            return found if len(found) == 3 else {}

        seen = await wait_for(lag, what="three consumers sampled")
        tg.cancel_scope.cancel()
    assert seen == {
        (subjects.collect_stream, "fetcher"): 3,
        (subjects.collect_stream, "runs"): 3,
        (subjects.raw_stream, "writer"): 0,
    }


@pytest.mark.anyio
async def test_lag_sampler_does_nothing_when_nothing_reads(nats_url: str, bus_prefix: str) -> None:
    subjects = Subjects(bus_prefix)
    async with Bus.open(
        nats_url, subjects, BusOptions(max_age_s=600, duplicate_window_s=60)
    ) as bus:
        with anyio.fail_after(1):
            await metrics.sample_consumer_lag(bus)  # returns at once: no metrics_reader, no polling


# -- recorded where it happens: the real daemon ----------------------------------------------
def hourly(api: LocalAPI, **extra: Any) -> dict[str, Any]:
    return {"name": "hourly", "url": api.url("/hourly"), "schedule": "0 * * * *", **extra}


def runs(db: psycopg.Connection[Any]) -> dict[int, str]:
    found = db.execute("SELECT scheduled_for, status FROM collection_runs").fetchall()
    return {slot.astimezone(UTC).hour: status for slot, status in found}


@pytest.mark.anyio
async def test_ticks_catchup_and_runs_are_counted(
    metrics_reader: InMemoryMetricReader,
    api: LocalAPI,
    make_settings: MakeSettings,
    db_conn: psycopg.Connection[Any],
) -> None:
    api.route("/hourly", json={"ok": True})
    settings = make_settings([hourly(api, catchup="latest")])
    clock = ManualClock(DAY.replace(hour=1) - timedelta(seconds=1))
    async with open_daemon(settings, clock=clock):
        clock.set(DAY.replace(hour=1, second=2))  # the 01:00 tick fires 2 s late
        await wait_for(lambda: runs(db_conn) == {1: "stored"}, what="the 01:00 run")
    # Down from 01:00 to 05:30: 02-04 are recorded as missed, 05:00 is caught up.
    async with open_daemon(settings, clock=ManualClock(DAY.replace(hour=5, minute=30))):
        expected = {1: "stored", 2: "missed", 3: "missed", 4: "missed", 5: "stored"}
        await wait_for(lambda: runs(db_conn) == expected, what="catch-up")

        def counted() -> dict[tuple[Any, ...], Any]:
            found = totals(metrics_reader, "coleta.runs", "coleta.outcome", "coleta.trigger")
            return found if sum(found.values()) == 5 else {}

        assert await wait_for(counted, what="five outcomes") == {
            ("stored", "schedule"): 1,
            ("missed", "schedule"): 3,
            ("stored", "catchup"): 1,
        }
    lateness = {
        a["coleta.trigger"]: p for a, p in points(metrics_reader, "coleta.schedule.lateness")
    }
    assert set(lateness) == {"schedule", "catchup"}
    assert (lateness["schedule"].count, lateness["schedule"].sum) == (1, 2.0)
    assert (lateness["catchup"].count, lateness["catchup"].sum) == (1, 1800.0)
    assert totals(metrics_reader, "coleta.writer.rows", "coleta.source") == {("hourly",): 2}


@pytest.mark.anyio
async def test_fetch_outcomes_retries_dead_letters_and_batches(
    metrics_reader: InMemoryMetricReader,
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "LAG_SAMPLE_EVERY_S", 0.05)
    api.route("/ok", json={"n": [1, 2, 3]})
    api.route("/flaky", status=503, body="busy", headers={"Retry-After": "0"}, times=1)
    api.route("/flaky", json={"n": 1})
    api.route("/denied", status=401, body="no")
    settings = make_settings([source(api, name, f"/{name}") for name in ("ok", "flaky", "denied")])
    async with open_daemon(settings) as daemon:
        ids = {}
        for name in ("ok", "flaky", "denied"):
            reply = await request_reply("trigger", {"source": name})
            ids[name] = msgspec.json.decode(reply.data)["run_id"]

        def statuses() -> dict[str, str]:
            found = dict(db_conn.execute("SELECT source, status FROM collection_runs").fetchall())
            done = found == {"ok": "stored", "flaky": "stored", "denied": "failed"}
            return found if done else {}

        await wait_for(statuses, what="all three runs")

        def lag_settled() -> dict[str, int]:
            found = {
                a["messaging.consumer.group.name"]: p.value
                for a, p in points(metrics_reader, "coleta.consumer.lag")
            }
            return found if found and not any(found.values()) else {}

        lag = await wait_for(lag_settled, what="every consumer caught up")
        subjects = daemon.bus.subjects

    assert set(lag) == {"fetcher", "runs", "writer"}
    assert totals(
        metrics_reader, "coleta.runs", "coleta.source", "coleta.outcome", "error.type"
    ) == {
        ("ok", "stored", None): 1,
        ("flaky", "stored", None): 1,
        ("denied", "failed", "http_status"): 1,
    }
    requests = totals(
        metrics_reader, "http.client.request.duration", "coleta.source", "http.response.status_code"
    )
    assert requests == {("ok", 200): 1, ("flaky", 503): 1, ("flaky", 200): 1, ("denied", 401): 1}
    durations = [p for _, p in points(metrics_reader, "http.client.request.duration")]
    assert all(0 < p.sum < 5 for p in durations)
    sizes = {
        a["coleta.source"]: p.sum
        for a, p in points(metrics_reader, "http.client.response.body.size")
    }
    assert sizes == {"ok": len(b'{"n": [1, 2, 3]}'), "flaky": len(b'{"n": 1}')}
    assert totals(metrics_reader, "coleta.fetch.retries", "coleta.source", "error.type") == {
        ("flaky", "http_status"): 1
    }
    assert totals(
        metrics_reader, "coleta.dead_letters", "coleta.source", "error.type", "coleta.stage"
    ) == {("denied", "http_status", "fetcher"): 1}
    assert totals(metrics_reader, "coleta.writer.rows", "coleta.source") == {
        ("ok",): 1,
        ("flaky",): 1,
    }
    # Every message written went through a batch of one of the two writer consumers: the
    # runs consumer saw 3 commands, the raw one 2 pages, 1 failure and the "started" of the
    # attempt handed back for a retry (and one more "started" for any run over a second).
    batched = totals(metrics_reader, "coleta.writer.batch.size", "messaging.consumer.group.name")
    assert set(batched) == {(subjects.runs_consumer,), (subjects.writer_consumer,)}
    messages = {
        a["messaging.consumer.group.name"]: p.sum
        for a, p in points(metrics_reader, "coleta.writer.batch.size")
        if a["coleta.outcome"] == "committed"
    }
    assert messages["runs"] == 3
    assert 4 <= messages["writer"] <= 7
    assert all(
        a["coleta.outcome"] == "committed" and p.sum > 0
        for a, p in points(metrics_reader, "coleta.writer.batch.duration")
    )


# -- nats micro stats --------------------------------------------------------------------------
@pytest.mark.anyio
def test_tracing_and_metrics_share_the_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "coleta-x")
    assert tracing.resource().attributes["service.name"] == "coleta-x"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    assert tracing.resource("other", "9").attributes["service.version"] == "9"


@pytest.mark.anyio
async def test_writer_batches_of_large_pages_stay_within_a_byte_budget(
    metrics_reader: InMemoryMetricReader,
    make_settings: MakeSettings,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
) -> None:
    # 48 pages of ~600 KB (800 KB on the bus) wait in the stream before the writer starts:
    # a batch by count alone would take all of them (38 MB) at once.
    settings = make_settings(
        [{"name": "big", "url": "http://127.0.0.1:9/", "schedule": "0 0 1 1 *"}]
    )
    async with open_daemon(settings, roles=frozenset({"service"})) as daemon:
        subject = daemon.bus.subjects.raw("big")
    body = bytes(range(256)) * 2400
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for page in range(48):
            payload = RawPayload(
                run_id="big@1",
                source="big",
                trigger="manual",
                scheduled_for=DAY,
                attempt=1,
                page=page,
                last=page == 47,
                fetched_at=DAY,
                url="http://127.0.0.1:9/",
                status_code=200,
                headers={},
                content_type="application/octet-stream",
                body=body,
            )
            await js.publish(subject, encode(payload), headers={"Nats-Msg-Id": f"big/{page}"})
    finally:
        await nc.close()
    async with open_daemon(settings, roles=frozenset({"writer"})):
        await wait_for(
            lambda: db_conn.execute("SELECT count(*) FROM collected_data").fetchone() == (48,),
            within_s=60,
        )
    sizes = [
        batch
        for attributes, batch in points(metrics_reader, "coleta.writer.batch.size")
        if attributes["messaging.consumer.group.name"] == daemon.bus.subjects.writer_consumer
    ]
    assert sum(batch.sum for batch in sizes) == 48
    on_the_bus = len(encode(payload))
    assert max(batch.max for batch in sizes) <= BATCH_BYTES // on_the_bus + 1
