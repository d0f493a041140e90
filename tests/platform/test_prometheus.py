"""OTEL_METRICS_EXPORTER=prometheus: coleta's metrics on /metrics, configured like the SDK's."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.errors import EXIT_CONFIG, ConfigError
from daemon.platform import meter, metrics, prometheus
from tests._proc import clean_env, spawn, wait_healthy
from tests.fix_faults import free_port
from tests.fix_http import LocalAPI
from tests.fix_otlp import Received


@pytest.fixture(autouse=True)
def _clean_metrics(no_otel_env: None) -> Iterator[None]:
    meter._reset_for_tests()
    yield
    meter._reset_for_tests()


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> int:
    """A free port on 127.0.0.1 that the endpoint is told to serve on."""
    chosen = free_port()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(chosen))
    return chosen


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` as Prometheus reads it: sample name → (labels, value) of each series."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def can_bind(port: int) -> bool:
    """Whether a server could listen on ``port`` now (with SO_REUSEADDR, as servers do: the
    scrapes' closed connections may still be in TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def serving_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "prometheus-metrics"]


# -- in process ---------------------------------------------------------------------------------
def test_metrics_are_served_under_their_prometheus_names_until_shutdown(port: int) -> None:
    metrics.setup_metrics(version="1.2.3")
    metrics.record_run("rates", "failed", trigger="schedule", error_type="http_status")
    metrics.record_run("rates", "failed", trigger="schedule", error_type="http_status")
    metrics.record_http_request(
        "rates", method="GET", server_address="api", server_port=80, duration_s=0.2,
        status_code=200, body_bytes=2048,
    )  # fmt: skip

    found = scrape(port)
    ((labels, value),) = found["coleta_runs_total"]
    assert value == 2
    assert {k: labels[k] for k in ("coleta_source", "coleta_outcome", "error_type")} == {
        "coleta_source": "rates",
        "coleta_outcome": "failed",
        "error_type": "http_status",
    }
    ((_, count),) = found["http_client_request_duration_seconds_count"]
    assert count == 1
    ((_, size),) = found["http_client_response_body_size_bytes_sum"]
    assert size == 2048
    ((target, _),) = found["target_info"]
    assert (target["service_name"], target["service_version"]) == ("coleta", "1.2.3")
    assert "process_resident_memory_bytes" in found  # the usual process collector too
    assert serving_threads() == ["prometheus-metrics"]
    assert not can_bind(port)

    metrics.shutdown_metrics()
    assert serving_threads() == []  # no thread left behind
    assert can_bind(port)  # the port is free again
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_second_setup_after_shutdown_serves_again(port: int) -> None:
    metrics.setup_metrics()
    metrics.shutdown_metrics()
    metrics.setup_metrics()
    metrics.record_retry("rates", "timeout")
    assert [value for _, value in scrape(port)["coleta_fetch_retries_total"]] == [1]


def test_otlp_and_prometheus_together(
    port: int, monkeypatch: pytest.MonkeyPatch, otlp_http_receiver: tuple[str, Received]
) -> None:
    endpoint, got = otlp_http_receiver
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp, prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    metrics.setup_metrics()
    metrics.record_dead_letter("rates", "poison", stage="writer")
    ((labels, value),) = scrape(port)["coleta_dead_letters_total"]
    assert (labels["coleta_stage"], value) == ("writer", 1)
    metrics.shutdown_metrics()
    ((_, attributes, point),) = got.points("coleta.dead_letters")
    assert (attributes["coleta.stage"], point.as_int) == ("writer", 1)


def test_prometheus_alone_pushes_nothing_to_the_otlp_endpoint_of_the_traces(
    port: int, monkeypatch: pytest.MonkeyPatch, otlp_http_receiver: tuple[str, Received]
) -> None:
    # The compose stack's case: traces go to an OTLP endpoint, metrics are scraped.
    endpoint, got = otlp_http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    metrics.setup_metrics()
    metrics.record_rows("rates", 3)
    assert [value for _, value in scrape(port)["coleta_writer_rows_total"]] == [3]
    metrics.shutdown_metrics()
    assert got.metrics == []


def test_the_address_defaults_to_the_specifications() -> None:
    assert prometheus.address_from_env() == ("localhost", 9464)


@pytest.mark.parametrize("value", ["abc", "-1", "65536"])
def test_a_port_that_is_no_port_number_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", value)
    with pytest.raises(ConfigError, match=rf"^OTEL_EXPORTER_PROMETHEUS_PORT: '{value}' is not"):
        metrics.setup_metrics()
    assert not meter.reading()


def test_an_unknown_exporter_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus,promethues")
    with pytest.raises(
        ConfigError, match=r"^OTEL_METRICS_EXPORTER: 'promethues' is not .*otlp, prometheus, none"
    ):
        metrics.setup_metrics()
    assert serving_threads() == []


def test_none_wins_over_prometheus(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus,none")
    metrics.setup_metrics()
    assert not meter.reading()
    assert can_bind(port)


def test_a_taken_port_is_a_config_error_naming_it(port: int) -> None:
    with socket.create_server(("127.0.0.1", port)):
        with pytest.raises(ConfigError) as caught:
            metrics.setup_metrics()
        assert str(caught.value) == (
            f"OTEL_EXPORTER_PROMETHEUS_PORT: port {port} on 127.0.0.1 is already in use, "
            "cannot serve metrics there; choose another port"
        )
    assert not meter.reading()
    assert serving_threads() == []


def test_a_host_that_is_not_this_machines_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, port: int
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "192.0.2.1")  # TEST-NET-1: not ours
    with pytest.raises(
        ConfigError,
        match=rf"^OTEL_EXPORTER_PROMETHEUS_HOST: cannot serve metrics on 192\.0\.2\.1:{port} ",
    ):
        metrics.setup_metrics()


# -- a real daemon -------------------------------------------------------------------------------
def daemon_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "coleta.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n{text}')
    return config


def test_a_daemon_whose_metrics_port_is_taken_exits_2_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    # Nothing answers on these: the daemon must give up on the port before it tries them.
    config = daemon_config(tmp_path, "connect_timeout_s = 1\n")
    unused = free_port()
    env = clean_env(
        NATS_URL=f"nats://127.0.0.1:{unused}",
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{unused}/none",
        COLETA_CONFIG=str(config),
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
    )
    log_path = tmp_path / "daemon.log"
    with socket.create_server(("127.0.0.1", port)), spawn(env, log_path) as daemon:
        code = daemon.proc.wait(timeout=30)
    lines = log_path.read_text().splitlines()
    assert code == EXIT_CONFIG, lines
    (failed,) = [json.loads(line) for line in lines if '"daemon.failed"' in line]
    assert failed["error"] == (
        f"OTEL_EXPORTER_PROMETHEUS_PORT: port {port} on 127.0.0.1 is already in use, "
        "cannot serve metrics there; choose another port"
    )
    assert failed["exit_code"] == EXIT_CONFIG
    assert "Traceback" not in log_path.read_text()


def test_a_daemon_serves_metrics_while_it_runs_and_frees_the_port_on_sigterm(
    api: LocalAPI, tmp_path: Path, nats_url: str, database_url: str, bus_prefix: str,
    db_schema: str,
) -> None:  # fmt: skip
    port = free_port()
    config = daemon_config(
        tmp_path, f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
    )
    client = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    daemon_env = client | {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
        "OTEL_SERVICE_NAME": "coleta-scraped",
    }
    log_path = tmp_path / "daemon.log"
    with spawn(daemon_env, log_path) as daemon:
        wait_healthy(client, daemon.proc, log_path, within_s=30)
        (serving,) = [json.loads(x) for x in log_path.read_text().splitlines() if "serving" in x]
        assert serving["event"] == "metrics.serving"
        assert serving["url"] == f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 15
        # The lag sampler asks JetStream at start-up: one series per durable consumer.
        while len(lag := scrape(port).get("coleta_consumer_lag", [])) < 3:
            assert time.monotonic() < deadline, lag
            time.sleep(0.2)
        assert {labels["messaging_consumer_group_name"] for labels, _ in lag} == {
            "fetcher",
            "runs",
            "writer",
        }
        ((target, _),) = scrape(port)["target_info"]
        assert target["service_name"] == "coleta-scraped"
        started = time.monotonic()
        assert daemon.stop() == 0, log_path.read_text()
        assert time.monotonic() - started < 10
    assert can_bind(port)
    assert '"event":"daemon.stopped"' in log_path.read_text()
