"""A real Prometheus scraping a real daemon: every metric of the README's table, and every
metric the alert rules and the dashboard use, is in Prometheus's own query API.

One daemon (``OTEL_METRICS_EXPORTER=prometheus``) runs a source that succeeds every 2 s and one
triggered once that fails (a 503 retried, then a 404 dead-lettered), and one Prometheus
(Debian's package) scrapes it every second with ops/prometheus/alerts.yml loaded; the tests of
this module share them.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests._proc import clean_env, coleta, spawn, wait_healthy
from tests.fix_faults import free_port
from tests.fix_http import LocalAPI
from tests.fix_nats import delete_prefixed_streams, run_async
from tests.ops._prometheus import (
    ALERTS,
    binary,
    dashboard_exprs,
    metric_names,
    readme_metrics,
    rule_exprs,
)

#: How long a name may take to reach Prometheus: a run, its write, a 1 s scrape.
SCRAPE_WITHIN_S = 45.0


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API."""

    url: str
    log: Path

    def get(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def names(self) -> set[str]:
        """Every ``__name__`` Prometheus has stored."""
        return set(self.get("/api/v1/label/__name__/values"))

    def wait_for(self, expected: set[str], within_s: float = SCRAPE_WITHIN_S) -> set[str]:
        """The names stored once all of ``expected`` are, or at the deadline."""
        deadline = time.monotonic() + within_s
        while not expected <= (names := self.names()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return names

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        return list(data["result"])


@contextlib.contextmanager
def running_prometheus(target: str, work: Path) -> Iterator[Prometheus]:
    """``prometheus`` scraping ``target`` every second as job ``coleta``, the alert rules
    loaded, its storage in ``work``; stopped with SIGTERM afterwards."""
    executable = binary("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ALERTS}\n"
        "scrape_configs:\n  - job_name: coleta\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = work / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                executable,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield Prometheus(url, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def scraped(
    tmp_path_factory: pytest.TempPathFactory, nats_url: str, database_url: str
) -> Iterator[Prometheus]:
    """A daemon with a succeeding and a failing source, and a Prometheus scraping it."""
    work = tmp_path_factory.mktemp("scrape")
    prefix = schema = f"t{secrets.token_hex(4)}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    api = LocalAPI()
    api.route("/ok", json={"EUR": 1.08})
    api.route("/broken", status=503, times=1)  # retried once …
    api.route("/broken", status=404)  # … then dead-lettered
    api.start()
    config = work / "coleta.toml"
    config.write_text(
        f'bus_prefix = "{prefix}"\ndatabase_schema = "{schema}"\nstate_dir = "{work / "state"}"\n'
        f'[[sources]]\nname = "ok"\nurl = "{api.url("/ok")}"\nschedule = "*/2 * * * * *"\n'
        f'[[sources]]\nname = "broken"\nurl = "{api.url("/broken")}"\nschedule = "0 0 1 1 *"\n'
        "retries = { max_attempts = 2, max_backoff_s = 0.2 }\n"
    )
    metrics_port = free_port()
    client = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    daemon_env = client | {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(metrics_port),
    }
    log_path = work / "daemon.log"
    try:
        with spawn(daemon_env, log_path) as daemon:
            wait_healthy(client, daemon.proc, log_path, within_s=30)
            for source in ("ok", "broken"):
                trigger = coleta("trigger", source, env=client)
                assert trigger.returncode == 0, trigger.stderr
            with running_prometheus(f"127.0.0.1:{metrics_port}", work) as prometheus:
                yield prometheus
            daemon.stop()
    finally:
        api.stop()
        run_async(lambda: delete_prefixed_streams(nats_url, prefix))
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_every_metric_of_the_readme_is_in_prometheus_by_its_prometheus_name(
    scraped: Prometheus,
) -> None:
    documented = readme_metrics()
    assert len(documented) >= 10
    expected = {name for row in documented for name in row.series()}
    assert {"coleta_runs_total", "http_client_request_duration_seconds_bucket"} <= expected
    names = scraped.wait_for(expected)
    missing = sorted(
        f"{row.name} ({row.kind}, {row.unit}) as {name}"
        for row in documented
        for name in row.series()
        if name not in names
    )
    assert missing == [], sorted(n for n in names if n.startswith(("coleta", "http")))


def test_prometheus_reads_the_runs_and_the_target_is_up(scraped: Prometheus) -> None:
    scraped.wait_for({"coleta_runs_total", "coleta_dead_letters_total"})
    (up,) = scraped.query('up{job="coleta"}')
    assert up["value"][1] == "1"
    outcomes = {
        (r["metric"]["coleta_source"], r["metric"]["coleta_outcome"]): float(r["value"][1])
        for r in scraped.query("sum by (coleta_source, coleta_outcome) (coleta_runs_total)")
    }
    assert outcomes[("ok", "stored")] >= 1
    assert outcomes[("broken", "failed")] == 1
    (dead,) = scraped.query("coleta_dead_letters_total")
    assert (dead["metric"]["coleta_source"], dead["metric"]["coleta_stage"]) == (
        "broken",
        "fetcher",
    )
    assert dead["metric"]["error_type"]
    (retried,) = scraped.query("coleta_fetch_retries_total")
    assert (retried["metric"]["coleta_source"], retried["value"][1]) == ("broken", "1")


def test_the_alert_rules_load_and_evaluate_in_prometheus(scraped: Prometheus) -> None:
    deadline = time.monotonic() + SCRAPE_WITHIN_S
    while True:
        rules = [
            rule for group in scraped.get("/api/v1/rules")["groups"] for rule in group["rules"]
        ]
        if all(rule["health"] == "ok" for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {rule["name"]: rule["health"] for rule in rules} == dict.fromkeys(rule_exprs(), "ok")


def test_every_metric_the_rules_and_the_dashboard_use_is_scraped(scraped: Prometheus) -> None:
    used: dict[str, set[str]] = {}
    for where, expr in (rule_exprs() | dashboard_exprs()).items():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    assert "coleta_runs_total" in used
    names = scraped.wait_for(set(used))
    assert {name: sorted(where) for name, where in used.items() if name not in names} == {}
