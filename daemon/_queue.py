"""Queue a run: build its collect command and publish it, starting the run's trace.

Shared by the ticker (scheduled slots) and the service (manual triggers). Each run gets its own
trace: a root span named after the trigger, whose producer span's context travels with the
command to the fetcher and on to the writer.
"""

from __future__ import annotations

from datetime import datetime

from opentelemetry import context as otel_context
from opentelemetry import trace

from contracts import CollectCommand, Trigger
from daemon import _tracing
from daemon._bus import Bus
from daemon.settings import SourceConfig

__all__ = ["queue_run"]


async def queue_run(
    bus: Bus,
    source: SourceConfig,
    scheduled_for: datetime,
    *,
    run_id: str,
    trigger: Trigger,
    now: datetime,
) -> CollectCommand:
    """Publish the command for one run; JetStream de-duplicates it by ``run_id``."""
    command = CollectCommand(
        run_id=run_id,
        source=source.name,
        scheduled_for=scheduled_for,
        interval_start=source.cron.prev_before(scheduled_for),
        trigger=trigger,
        requested_at=now,
    )
    with _tracing.tracer().start_as_current_span(
        f"{trigger} {source.name}",
        context=otel_context.Context(),  # a new trace per run
        kind=trace.SpanKind.INTERNAL,
        attributes={
            _tracing.COLETA_SOURCE: source.name,
            _tracing.COLETA_RUN_ID: run_id,
            "coleta.trigger": trigger,
            "coleta.scheduled_for": scheduled_for.isoformat(),
        },
    ):
        await bus.publish(
            bus.subjects.collect(source.name),
            command,
            msg_id=run_id,
            source=source.name,
            run_id=run_id,
        )
    return command
