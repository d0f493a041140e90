"""A late or failing source is visible before anyone asks: ``coleta.health`` degraded naming
it, ``coleta status`` marking it, and the ``coleta.source.*`` gauges; a stored run clears it.

Time moves on the daemon's clock (``ManualClock``), never by waiting: the service judges
freshness by it, while runs finish on the real clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import psycopg
import pytest
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, NumberDataPoint

from daemon.app import open_daemon
from daemon.platform import meter
from daemon.platform.clock import ManualClock
from daemon.service import _freshness
from tests._collect import run, source
from tests._proc import clean_env, coleta
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

GAUGES = (
    "coleta.source.freshness",
    "coleta.source.late",
    "coleta.source.consecutive_failures",
)


@pytest.fixture(autouse=True)
def _clean_metrics(no_otel_env: None) -> Iterator[None]:
    meter._reset_for_tests()
    yield
    meter._reset_for_tests()


async def ask(request_reply: Requester, endpoint: str) -> Any:
    return msgspec.json.decode((await request_reply(endpoint)).data)


def gauges(reader: InMemoryMetricReader) -> dict[str, dict[str, Any]]:
    """``{metric: {source: value}}`` of the three source gauges, as an exporter reads them."""
    out: dict[str, dict[str, Any]] = {name: {} for name in GAUGES}
    units: dict[str, str] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name in out:
                    assert isinstance(metric.data, Gauge), metric.name
                    units[metric.name] = metric.unit or ""
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint), metric.name  # a gauge
                        source = (point.attributes or {})["coleta.source"]
                        out[metric.name][str(source)] = point.value
    if units:
        assert units == dict(zip(GAUGES, ("s", "{source}", "{run}"), strict=True))
    return out


def cli(bus_prefix: str, nats_url: str, *args: str) -> Any:
    """``coleta ARGS`` as a user runs it, against the daemon of this test."""
    env = clean_env(NATS_URL=nats_url, COLETA_BUS_PREFIX=bus_prefix)
    return anyio.to_thread.run_sync(lambda: coleta(*args, env=env))


def line_of(output: str, name: str) -> str:
    (line,) = [ln for ln in output.splitlines() if ln.startswith(f"{name} ")]
    return line


async def test_a_source_failing_n_times_in_a_row_degrades_health_until_a_run_is_stored(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    metrics_reader: InMemoryMetricReader,
    nats_url: str,
    bus_prefix: str,
) -> None:
    api.route("/flaky", status=503, body="down for maintenance", times=2)
    api.route("/flaky", json={"ok": True})
    api.route("/steady", json={"ok": True})
    settings = make_settings(
        [
            source(api, "flaky", "/flaky", retries={"max_attempts": 1}),
            source(api, "steady", "/steady"),
        ],
        failures_before_degraded=2,
    )
    async with open_daemon(settings, roles=("service", "fetcher", "writer")):
        assert (await run(request_reply, db_conn, "flaky"))["status"] == "failed"
        once = await ask(request_reply, "health")
        assert (await run(request_reply, db_conn, "flaky"))["status"] == "failed"
        twice = await ask(request_reply, "health")
        failing_gauges = gauges(metrics_reader)
        status = await ask(request_reply, "status")
        health_cli = await cli(bus_prefix, nats_url, "health")
        container_cli = await cli(bus_prefix, nats_url, "health", "--ignore-sources")
        status_cli = await cli(bus_prefix, nats_url, "status")

        assert (await run(request_reply, db_conn, "flaky"))["status"] == "stored"
        recovered = await ask(request_reply, "health")
        recovered_gauges = gauges(metrics_reader)

    assert once["status"] == "ok", once  # one failure: below failures_before_degraded
    assert twice["status"] == "degraded"
    assert twice["reason"] == "sources: failing: flaky (2 failed runs in a row)"
    assert twice["checks"]["sources"] == {
        "ok": False,
        "detail": "failing: flaky (2 failed runs in a row)",
    }
    assert (twice["failing"], twice["late"]) == (["flaky"], [])
    assert all(check["ok"] for name, check in twice["checks"].items() if name != "sources")
    assert failing_gauges["coleta.source.consecutive_failures"] == {"flaky": 2, "steady": 0}
    assert failing_gauges["coleta.source.late"] == {"flaky": 0, "steady": 0}

    flaky = {s["name"]: s for s in status["sources"]}["flaky"]
    assert (flaky["consecutive_failures"], flaky["failing"], flaky["late"]) == (2, True, False)

    assert health_cli.returncode == 4, health_cli.stderr
    assert health_cli.stdout == "degraded: sources: failing: flaky (2 failed runs in a row)\n"
    assert container_cli.returncode == 0, container_cli.stdout  # the daemon itself is fine
    assert status_cli.returncode == 0, status_cli.stderr
    assert "sources 1 failing" in status_cli.stdout.splitlines()[0]
    # LAST, AGE (never stored: since first seen), ROWS, FAILS marked, DLQ
    assert " failed " in line_of(status_cli.stdout, "flaky")
    assert " 2! " in line_of(status_cli.stdout, "flaky")
    assert "!" not in line_of(status_cli.stdout, "steady")

    assert recovered["status"] == "ok", recovered
    assert recovered["failing"] == []
    assert recovered_gauges["coleta.source.consecutive_failures"]["flaky"] == 0


async def test_a_source_past_its_freshness_is_late_until_a_run_is_stored(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    metrics_reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """``freshness_s = 120`` on a per-minute schedule; no ticker runs, so only the runs the
    test triggers are stored. ``paused`` (disabled) is never late."""
    monkeypatch.setattr(_freshness, "FRESHNESS_SAMPLE_EVERY_S", 0.05)
    api.route("/minutely", json={"ok": True})
    settings = make_settings(
        [
            source(api, "minutely", "/minutely", schedule="* * * * *", freshness_s=120),
            source(
                api, "paused", "/minutely", schedule="* * * * *", freshness_s=120, enabled=False
            ),
        ]
    )
    start = datetime.now(UTC)
    clock = ManualClock(start)
    async with open_daemon(settings, clock=clock, roles=("service", "fetcher", "writer")):
        at_start = await ask(request_reply, "health")

        # Never stored: measured from when the daemon started with it.
        clock.set(start + timedelta(seconds=121))
        sampled = await wait_for(
            lambda: (
                gauges(metrics_reader)["coleta.source.late"].get("minutely") == 1
                and gauges(metrics_reader)
            ),
            what="the sampler to see the source late",
        )
        never = await ask(request_reply, "health")

        # A stored run that finished after start + 1 s (the clock's 121 s minus the 120 s
        # window): fresh again.
        await anyio.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds() + 1.5))
        stored = await run(request_reply, db_conn, "minutely")
        back = await ask(request_reply, "health")

        # 121 s after that run finished: late again, measured from it.
        finished = db_conn.execute(
            "SELECT finished_at FROM collection_runs WHERE run_id = %s", (stored["run_id"],)
        ).fetchone()
        assert finished is not None
        clock.set(finished[0] + timedelta(seconds=121))
        late = await ask(request_reply, "health")
        status = await ask(request_reply, "status")
        late_gauges = gauges(metrics_reader)
        status_cli = await cli(bus_prefix, nats_url, "status")

    assert at_start["status"] == "ok", at_start  # not late at second 0
    assert at_start["checks"]["sources"] == {"ok": True, "detail": "ok"}

    assert sampled["coleta.source.freshness"] == {"minutely": 121.0, "paused": 121.0}
    assert sampled["coleta.source.late"] == {"minutely": 1, "paused": 0}
    assert never["status"] == "degraded"
    assert never["reason"] == (
        "sources: late: minutely (no stored run yet, first seen 2m1s ago; expected within 2m)"
    )
    assert (never["late"], never["failing"]) == (["minutely"], [])

    assert stored["status"] == "stored"
    assert back["status"] == "ok", back

    assert late["status"] == "degraded"
    assert late["reason"] == (
        "sources: late: minutely (no stored run for 2m1s; expected within 2m)"
    )
    assert late["late"] == ["minutely"]
    minutely = {s["name"]: s for s in status["sources"]}["minutely"]
    assert (minutely["late"], minutely["failing"]) == (True, False)
    assert (minutely["freshness_age_s"], minutely["freshness_s"]) == (121.0, 120.0)
    assert late_gauges["coleta.source.freshness"]["minutely"] == 121.0
    assert late_gauges["coleta.source.late"]["minutely"] == 1
    assert "sources 1 late" in status_cli.stdout.splitlines()[0]
    assert " 2m1s! " in line_of(status_cli.stdout, "minutely")
