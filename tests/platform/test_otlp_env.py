"""OTLP export configured only by the standard OTEL_* variables, up to a real `coleta run`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from daemon.platform import meter, metrics, tracing
from daemon.platform.spans import producer_span
from tests import ROOT
from tests._proc import clean_env, coleta, spawn, wait_healthy
from tests.fix_http import LocalAPI
from tests.fix_otlp import Received


@pytest.fixture(autouse=True)
def _clean_otel(no_otel_env: None) -> Iterator[None]:
    meter._reset_for_tests()
    yield
    meter._reset_for_tests()
    tracing._reset_for_tests()


def runs_counted(got: Received) -> dict[tuple[str, str], int]:
    """The last exported value of ``coleta.runs`` per (source, outcome)."""
    found: dict[tuple[str, str], int] = {}
    for _, attributes, point in got.points("coleta.runs"):
        found[(attributes["coleta.source"], attributes["coleta.outcome"])] = point.as_int
    return found


# -- in process --------------------------------------------------------------------------------
def test_metrics_reach_an_otlp_http_receiver_when_shut_down(
    monkeypatch: pytest.MonkeyPatch, otlp_http_receiver: tuple[str, Received]
) -> None:
    endpoint, got = otlp_http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only the final export
    monkeypatch.setenv("OTEL_SERVICE_NAME", "coleta-m")
    metrics.setup_metrics(version="1.2.3")
    metrics.record_run("rates", "stored", trigger="schedule")
    metrics.record_run("rates", "stored", trigger="schedule")
    assert got.metrics == []
    metrics.shutdown_metrics()

    assert got.paths == ["/v1/metrics"]
    assert runs_counted(got) == {("rates", "stored"): 2}
    ((resource, attributes, _),) = got.points("coleta.runs")
    assert resource["service.name"] == "coleta-m"
    assert resource["service.version"] == "1.2.3"
    assert attributes == {
        "coleta.source": "rates",
        "coleta.outcome": "stored",
        "coleta.trigger": "schedule",
    }


def test_a_burst_of_20000_spans_reaches_the_collector_whole(
    monkeypatch: pytest.MonkeyPatch, otlp_http_receiver: tuple[str, Received]
) -> None:
    # 10,000 sources due at one instant end two spans each at once; the SDK's default queue
    # (2,048 spans) would drop most of them.
    endpoint, got = otlp_http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    tracing.setup_tracing()
    tracer = tracing.tracer()
    for i in range(20_000):
        tracer.start_span(f"send coleta.collect.s{i}").end()
    tracing.shutdown_tracing(timeout_s=30)
    assert len(got.spans()) == 20_000


def test_metrics_go_by_grpc_by_default_to_their_own_endpoint(
    monkeypatch: pytest.MonkeyPatch,
    otlp_grpc_receiver: tuple[str, Received],
    otlp_http_receiver: tuple[str, Received],
) -> None:
    endpoint, got = otlp_grpc_receiver
    traces_endpoint, traces_got = otlp_http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{traces_endpoint}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    metrics.setup_metrics()
    tracing.setup_tracing()
    metrics.record_dead_letter("rates", "poison", stage="writer")
    with producer_span("coleta.cmd.rates", source="rates", run_id="r1"):
        pass
    metrics.shutdown_metrics()
    tracing.shutdown_tracing()

    ((resource, attributes, point),) = got.points("coleta.dead_letters")
    assert resource["service.name"] == "coleta"
    assert (attributes["error.type"], point.as_int) == ("poison", 1)
    assert traces_got.metrics == []  # each signal to its own endpoint
    assert [span.name for _, span in traces_got.spans()] == ["send coleta.cmd.rates"]


def test_an_unresponsive_collector_cannot_hold_up_shutdown() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        code = (
            "import time\n"
            "from daemon.platform import metrics as m\n"
            "m.setup_metrics()\n"
            "m.record_run('x', 'stored')\n"
            "started = time.monotonic()\n"
            "m.shutdown_metrics(timeout_s=0.5)\n"
            "assert time.monotonic() - started < 1.5, time.monotonic() - started\n"
        )
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "20",
        }
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=30)
        # The exporter alone would wait 20 s for an answer, and an exit hook again.
        assert time.monotonic() - started < 10


# -- a real daemon -----------------------------------------------------------------------------
def stored_trace(database_url: str, schema: str) -> str | None:
    with psycopg.connect(database_url, options=f"-c search_path={schema}") as conn:
        row = conn.execute(
            "SELECT trace_id FROM collection_runs WHERE status = 'stored'"
        ).fetchone()
    return row[0] if row else None


def test_a_daemon_exports_its_runs_trace_and_metrics_and_flushes_them_on_sigterm(
    otlp_http_receiver: tuple[str, Received],
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    endpoint, got = otlp_http_receiver
    api.route("/otlp", json={"otlp": True})
    config = tmp_path / "coleta.toml"
    config.write_text(
        f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[[sources]]\nname = "otlp"\nurl = "{api.url("/otlp")}"\nschedule = "0 0 1 1 *"\n'
    )
    client = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    daemon_env = client | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "coleta-test",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    log_path = tmp_path / "daemon.log"
    with spawn(daemon_env, log_path) as daemon:
        wait_healthy(client, daemon.proc, log_path, within_s=30)
        trigger = coleta("trigger", "otlp", env=client)
        assert trigger.returncode == 0, trigger.stderr
        run_id = trigger.stdout.split()[1]
        deadline = time.monotonic() + 30
        while (trace_id := stored_trace(database_url, db_schema)) is None:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert daemon.stop() == 0, log_path.read_text()

    assert set(got.paths) == {"/v1/traces", "/v1/metrics"}
    in_trace = [
        (resource, span) for resource, span in got.spans() if span.trace_id.hex() == trace_id
    ]
    names = {span.name for _, span in in_trace}
    collect, raw = f"{bus_prefix}.collect.otlp", f"{bus_prefix}.raw.otlp"
    expected = {
        "manual otlp",
        f"send {collect}",
        f"process {collect}",
        "GET",
        f"process {raw}",
        "write writer",
        "INSERT collected_data",
    }
    assert expected <= names, names
    assert {resource["service.name"] for resource, _ in in_trace} == {"coleta-test"}
    tagged = {
        span.trace_id.hex()
        for _, span in got.spans()
        for kv in span.attributes
        if kv.key == "coleta.run_id" and kv.value.string_value == run_id
    }
    assert tagged == {trace_id}  # every span of the run, in the one trace stored with it

    assert runs_counted(got) == {("otlp", "stored"): 1}
    resources = {resource["service.name"] for resource, _, _ in got.points("coleta.runs")}
    assert resources == {"coleta-test"}
    assert got.points("http.client.request.duration")
    assert '"event":"daemon.stopped"' in log_path.read_text()
