"""The ticker at scale: the runs due at one instant go out as one burst, prepared ahead.

Real NATS, a ticker-only daemon and a ManualClock: each test moves time to just before an
instant (the burst is prepared, nothing is published) and then past it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.js.api import DiscardPolicy
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts import CollectCommand, Subjects, decoder
from daemon.app import Daemon, open_daemon
from daemon.platform.clock import ManualClock
from daemon.settings import Settings
from tests.fix_daemon import MakeSettings, wait_for

pytestmark = pytest.mark.anyio

SLOT = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
#: More than the ticker's ``_FREEZE_FROM``, so the large-burst path runs.
MANY = 1_200
_command = decoder(CollectCommand)


def daily(names: list[str]) -> list[dict[str, Any]]:
    return [{"name": n, "url": "http://127.0.0.1:9/x", "schedule": "0 6 * * *"} for n in names]


def ns(when: datetime) -> int:
    return round(when.timestamp()) * 1_000_000_000


async def on_bus(nats_url: str, subjects: Subjects) -> tuple[dict[str, int], list[Any]]:
    """Messages per subject in the collect stream, and every message (oldest first)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.collect_stream, subjects_filter=">")
        counts = dict(info.state.subjects or {})
        messages = [
            await js.get_msg(subjects.collect_stream, seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
            if info.state.messages
        ]
        return counts, messages
    finally:
        await nc.close()


async def limit_collect_stream(nats_url: str, subjects: Subjects, max_msgs: int) -> None:
    """Make JetStream refuse commands past ``max_msgs`` (-1: no limit again)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(subjects.collect_stream)).config
        config.max_msgs, config.discard = max_msgs, DiscardPolicy.NEW
        await js.update_stream(config)
    finally:
        await nc.close()


async def prepared(daemon: Daemon, count: int) -> None:
    """Wait until the ticker holds ``count`` prepared runs for the coming instant."""
    # White-box on purpose: from outside, "prepared" and "not yet planned" look the same.
    await wait_for(lambda: len(daemon.ticker._due) == count, what=f"{count} prepared runs")


def lateness_points(reader: InMemoryMetricReader) -> list[Any]:
    data = reader.get_metrics_data()
    return [
        point
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "coleta.schedule.lateness"
        for point in metric.data.data_points
    ]


def bursts(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    """The fields of each ``event`` line the ticker logged."""
    return [vars(record) for record in caplog.records if record.getMessage() == event]


async def test_runs_due_at_one_instant_go_out_once_each_at_the_instant_with_their_trace(
    make_settings: MakeSettings,
    nats_url: str,
    spans: InMemorySpanExporter,
    metrics_reader: InMemoryMetricReader,
    no_otel_env: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coleta.ticker")
    names = [f"s{i:04d}" for i in range(MANY)]
    settings = make_settings(daily(names))
    clock = ManualClock(SLOT - timedelta(seconds=30))
    async with open_daemon(settings, clock=clock, roles=["ticker"]) as daemon:
        subjects = daemon.bus.subjects
        clock.set(SLOT - timedelta(milliseconds=500))
        await prepared(daemon, MANY)
        assert (await on_bus(nats_url, subjects))[0] == {}, "nothing before the instant"
        assert daemon.ticker.next_runs() == dict.fromkeys(names, SLOT)

        clock.set(SLOT + timedelta(seconds=2))  # the burst goes out 2 s late
        await wait_for(lambda: daemon.ticker.ticks == MANY, what="every run queued")
        counts, messages = await on_bus(nats_url, subjects)
        assert daemon.ticker.next_runs() == dict.fromkeys(names, SLOT + timedelta(days=1))

    assert counts == {subjects.collect(name): 1 for name in names}
    finished = spans.get_finished_spans()
    by_id = {span.context.span_id: span for span in finished}
    roots = {span.name: span for span in finished if span.parent is None}
    assert len(finished) == 2 * MANY
    assert len({span.context.trace_id for span in finished}) == MANY, "one trace per run"
    for msg in messages:
        command = _command.decode(msg.data)
        run_id = f"{command.source}@20261128T060000Z"
        assert (command.run_id, command.trigger, command.scheduled_for) == (
            run_id,
            "schedule",
            SLOT,
        )
        assert command.interval_start == SLOT - timedelta(days=1)
        assert command.requested_at == SLOT + timedelta(seconds=2), "when it was handed over"
        headers = dict(msg.headers or {})
        assert headers["Nats-Msg-Id"] == run_id
        _, trace_id, span_id, _ = headers["traceparent"].split("-")
        producer = by_id[int(span_id, 16)]
        root = roots[f"schedule {command.source}"]
        assert producer.name == f"send {subjects.collect(command.source)}"
        assert producer.kind.name == "PRODUCER"
        assert producer.parent is not None
        assert producer.parent.span_id == root.context.span_id
        assert f"{root.context.trace_id:032x}" == trace_id
        assert (root.attributes or {})["coleta.run_id"] == run_id
        assert (producer.attributes or {})["messaging.message.body.size"] == len(msg.data)
        # Both start at the instant the run was due and end once the burst was acked.
        for span in (root, producer):
            assert (span.start_time, span.end_time) == (ns(SLOT), ns(SLOT + timedelta(seconds=2)))

    points = lateness_points(metrics_reader)
    assert len(points) == MANY, "recorded for every run (one stream per source)"
    assert {(point.count, point.sum) for point in points} == {(1, 2.0)}
    (burst,) = bursts(caplog, "tick.burst")
    assert (burst["queued"], burst["refused"], burst["lateness_max_s"]) == (MANY, 0, 2.0)
    assert not bursts(caplog, "tick.queued"), "per-run lines are debug"


async def test_runs_the_bus_refused_are_retried_and_each_runs_once(
    make_settings: MakeSettings, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coleta.ticker")
    names = [f"r{i:02d}" for i in range(20)]
    settings = make_settings(daily(names))
    clock = ManualClock(SLOT - timedelta(seconds=30))
    async with open_daemon(settings, clock=clock, roles=["ticker"]) as daemon:
        subjects = daemon.bus.subjects
        await limit_collect_stream(nats_url, subjects, 5)  # JetStream refuses the other 15
        clock.set(SLOT)
        await wait_for(lambda: bursts(caplog, "tick.publish_failed"), what="the refusals")
        assert daemon.ticker.ticks == 5
        counts, _ = await on_bus(nats_url, subjects)
        assert len(counts) == 5
        # The refused ones wait for their retry, still for the same slot.
        waiting = {name for name, slot in daemon.ticker.next_runs().items() if slot == SLOT}
        assert waiting == {name for name in names if subjects.collect(name) not in counts}

        await limit_collect_stream(nats_url, subjects, -1)
        clock.set(SLOT + timedelta(seconds=1))
        await anyio.sleep(0.2)
        assert daemon.ticker.ticks == 5, "not retried before 2 s"
        clock.set(SLOT + timedelta(seconds=2))
        await wait_for(lambda: daemon.ticker.ticks == 20, what="the retried runs")
        counts, messages = await on_bus(nats_url, subjects)

    assert counts == {subjects.collect(name): 1 for name in names}
    assert len(messages) == 20
    (failed,) = bursts(caplog, "tick.publish_failed")
    assert failed["refused"] == 15
    assert "maximum messages exceeded" in failed["error"]
    first, retry = bursts(caplog, "tick.burst")
    assert (first["queued"], first["refused"]) == (5, 15)
    assert (retry["queued"], retry["refused"], retry["lateness_max_s"]) == (15, 0, 2.0)


@pytest.mark.parametrize("count", [2, 6], ids=["one-by-one", "burst"])
async def test_a_burst_finding_no_stream_declares_the_streams_again(
    make_settings: MakeSettings, nats_url: str, count: int
) -> None:
    names = [f"v{i}" for i in range(count)]
    clock = ManualClock(SLOT - timedelta(seconds=30))
    async with open_daemon(make_settings(daily(names)), clock=clock, roles=["ticker"]) as daemon:
        subjects = daemon.bus.subjects
        await daemon.bus.js.delete_stream(subjects.collect_stream)  # a server that lost it
        clock.set(SLOT)
        await wait_for(lambda: daemon.ticker.ticks == count, what="the burst, sent again")
        assert daemon.bus.redeclared == 1
        counts, _ = await on_bus(nats_url, subjects)
    assert counts == {subjects.collect(name): 1 for name in names}


async def test_a_reload_while_a_burst_waits_for_its_instant_replans_it(
    make_settings: MakeSettings, nats_url: str
) -> None:
    settings: Settings = make_settings(daily(["kept", "removed", "retimed"]))
    changed = daily(["kept", "retimed", "added"])
    changed[1]["schedule"] = "0 7 * * *"
    clock = ManualClock(SLOT - timedelta(seconds=30))
    async with open_daemon(settings, clock=clock, roles=["ticker"]) as daemon:
        subjects = daemon.bus.subjects
        clock.set(SLOT - timedelta(milliseconds=500))
        await prepared(daemon, 3)
        daemon.apply(make_settings(changed))
        assert daemon.ticker.next_runs() == {
            "kept": SLOT,
            "retimed": SLOT + timedelta(hours=1),
            "added": SLOT,
        }
        clock.set(SLOT)
        await wait_for(lambda: daemon.ticker.ticks == 2, what="kept and added")
        counts, _ = await on_bus(nats_url, subjects)
        assert counts == {subjects.collect("kept"): 1, subjects.collect("added"): 1}
        clock.set(SLOT + timedelta(hours=1))
        await wait_for(lambda: daemon.ticker.ticks == 3, what="retimed")
        assert daemon.ticker.next_runs() == {
            "kept": SLOT + timedelta(days=1),
            "retimed": SLOT + timedelta(days=1, hours=1),
            "added": SLOT + timedelta(days=1),
        }
    payloads = [msgspec.json.decode(m.data) for m in (await on_bus(nats_url, subjects))[1]]
    assert sorted(p["run_id"] for p in payloads) == [
        "added@20261128T060000Z",
        "kept@20261128T060000Z",
        "retimed@20261128T070000Z",
    ]
