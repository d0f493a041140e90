"""Metrics: the instruments coleta records, behind one seam, exported like the traces.

Every stage records through the small ``record_*`` functions below, so names, units and
attributes stay stable; nothing else knows about meters or exporters. Attribute names follow
the OpenTelemetry semantic conventions where one exists (``http.client.request.duration``,
``error.type``, ``messaging.*``); coleta's own are ``coleta.*``.

====================================== ========= ============= =====================================
name                                   kind      unit          attributes
====================================== ========= ============= =====================================
``coleta.runs``                        counter   ``{run}``     source, outcome, trigger, error.type
``http.client.request.duration``       histogram ``s``         source, method, status, server, error
``http.client.response.body.size``     histogram ``By``        source, method, status, server
``coleta.fetch.retries``               counter   ``{retry}``   source, error.type
``coleta.dead_letters``                counter   ``{message}`` source, error.type, stage
``coleta.writer.rows``                 counter   ``{row}``     source
``coleta.writer.batch.size``           histogram ``{message}`` consumer group, outcome
``coleta.writer.batch.duration``       histogram ``s``         consumer group, outcome
``coleta.schedule.lateness``           histogram ``s``         source, trigger
``coleta.consumer.lag``                gauge     ``{message}`` messaging system, stream, consumer
``coleta.source.freshness``            gauge     ``s``         source
``coleta.source.late``                 gauge     ``{source}``  source
``coleta.source.consecutive_failures`` gauge     ``{run}``     source
====================================== ========= ============= =====================================

Instruments record whenever something reads them (``meter``): the OTLP exporter (every
``OTEL_METRIC_EXPORT_INTERVAL`` ms, and once more at shutdown), which exists only when the
standard ``OTEL_*`` variables name an endpoint and ``OTEL_METRICS_EXPORTER`` includes ``otlp``
(its default); the Prometheus endpoint (``prometheus``: ``/metrics``, read at each scrape) when
``OTEL_METRICS_EXPORTER`` includes ``prometheus``; or a test's in-memory reader
(``use_reader``). With none of them, every ``record_*`` call returns at once and the
consumer-lag sampler does not poll. The ``coleta.source.*`` gauges report what the service
role last evaluated of each source's freshness (``set_source_gauges``): reading them asks
PostgreSQL nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio
from opentelemetry.util.types import AttributeValue

from daemon.errors import BusUnavailable
from daemon.platform import tracing
from daemon.platform.logs import get_logger
from daemon.platform.meter import (
    BATCH_DURATION,
    BATCH_SIZE,
    CONSECUTIVE_FAILURES,
    CONSUMER_LAG,
    DEAD_LETTERS,
    ERROR_TYPE,
    FETCH_RETRIES,
    FRESHNESS,
    HTTP_DURATION,
    HTTP_RESPONSE_SIZE,
    LATE,
    METER_NAME,
    OUTCOME,
    ROWS,
    RUNS,
    SCHEDULE_LATENESS,
    STAGE,
    TRIGGER,
    BatchOutcome,
    Outcome,
    SourceGauges,
    live,
    reading,
    set_consumer_lag,
    set_source_gauges,
    setup_metrics,
    shutdown_metrics,
    use_reader,
)

if TYPE_CHECKING:
    from daemon.platform.bus import Bus

__all__ = [
    "BATCH_DURATION",
    "BATCH_SIZE",
    "CONSECUTIVE_FAILURES",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "FETCH_RETRIES",
    "FRESHNESS",
    "HTTP_DURATION",
    "HTTP_RESPONSE_SIZE",
    "LAG_SAMPLE_EVERY_S",
    "LATE",
    "METER_NAME",
    "OUTCOME",
    "ROWS",
    "RUNS",
    "SCHEDULE_LATENESS",
    "BatchOutcome",
    "Outcome",
    "SourceGauges",
    "reading",
    "record_batch",
    "record_dead_letter",
    "record_http_request",
    "record_lateness",
    "record_retry",
    "record_rows",
    "record_run",
    "sample_consumer_lag",
    "set_consumer_lag",
    "set_source_gauges",
    "setup_metrics",
    "shutdown_metrics",
    "use_reader",
]

log = get_logger("metrics")

#: How often the lag of each durable consumer is asked of JetStream.
LAG_SAMPLE_EVERY_S = 10.0
_LAG_QUERY_TIMEOUT_S = 2.0


# -- recording -----------------------------------------------------------------------------
def _attributes(values: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    return {key: value for key, value in values.items() if value is not None}


def record_run(
    source: str, outcome: Outcome, *, trigger: str | None = None, error_type: str | None = None
) -> None:
    """A run reached ``outcome`` (counted by the writer once it is committed)."""
    if (found := live()) is None:
        return
    found.runs.add(
        1,
        _attributes(
            {
                tracing.COLETA_SOURCE: source,
                OUTCOME: outcome,
                TRIGGER: trigger,
                ERROR_TYPE: error_type,
            }
        ),
    )


def record_http_request(
    source: str,
    *,
    method: str,
    server_address: str,
    server_port: int | None,
    duration_s: float,
    status_code: int | None = None,
    error_type: str | None = None,
    body_bytes: int | None = None,
) -> None:
    """One HTTP request of a run: its duration and, when it succeeded, the body's size.

    ``error.type`` follows the HTTP conventions: the status code for a response >= 400,
    else a short code (``timeout``, ``connect``, ``response_too_large``).
    """
    if (found := live()) is None:
        return
    if status_code is not None and status_code >= 400:
        error_type = str(status_code)
    attributes = _attributes(
        {
            "http.request.method": method,
            "server.address": server_address,
            "server.port": server_port,
            "http.response.status_code": status_code,
            ERROR_TYPE: error_type,
            tracing.COLETA_SOURCE: source,
        }
    )
    found.http_duration.record(duration_s, attributes)
    if body_bytes is not None and error_type is None:
        found.http_size.record(body_bytes, attributes)


def record_retry(source: str, error_type: str) -> None:
    """A failed attempt was handed back to be tried again."""
    if (found := live()) is not None:
        found.retries.add(1, {tracing.COLETA_SOURCE: source, ERROR_TYPE: error_type})


def record_dead_letter(source: str, error_type: str, *, stage: str) -> None:
    """A message went to the dead-letter stream; ``stage`` is ``fetcher`` or ``writer``."""
    if (found := live()) is not None:
        found.dead_letters.add(
            1, {tracing.COLETA_SOURCE: source, ERROR_TYPE: error_type, STAGE: stage}
        )


def record_rows(source: str, count: int) -> None:
    """``count`` collected_data rows of ``source`` were in a committed transaction (a
    replayed page that ``ON CONFLICT`` skipped counts too)."""
    if count and (found := live()) is not None:
        found.rows.add(count, {tracing.COLETA_SOURCE: source})


def record_batch(consumer: str, *, size: int, duration_s: float, outcome: BatchOutcome) -> None:
    """A writer batch of ``size`` messages from durable ``consumer`` ended with ``outcome``."""
    if (found := live()) is None:
        return
    attributes = {tracing.CONSUMER_GROUP: consumer, OUTCOME: outcome}
    found.batch_size.record(size, attributes)
    found.batch_duration.record(duration_s, attributes)


def record_lateness(source: str, lateness_s: float, *, trigger: str) -> None:
    """A slot's run was queued ``lateness_s`` after the slot (``schedule`` or ``catchup``)."""
    if (found := live()) is not None:
        found.lateness.record(
            max(0.0, lateness_s), {tracing.COLETA_SOURCE: source, TRIGGER: trigger}
        )


async def sample_consumer_lag(bus: Bus, *, every_s: float | None = None) -> None:
    """Ask JetStream for each durable consumer's backlog every ``every_s`` (default
    ``LAG_SAMPLE_EVERY_S``), for the ``coleta.consumer.lag`` gauge; runs until cancelled.

    Returns at once when nothing reads the metrics (no exporter configured, no test reader).
    Every replica reports the same server-side numbers: aggregate them with max, not sum.
    """
    if not reading():
        return
    while True:
        for stream, consumer in bus.subjects.consumers:
            try:
                pending = await bus.consumer_backlog(stream, consumer, _LAG_QUERY_TIMEOUT_S)
            except BusUnavailable as exc:
                set_consumer_lag(stream, consumer, None)
                log.debug(
                    "metrics.lag_unavailable", extra={"consumer": consumer, "error": str(exc)}
                )
                continue
            set_consumer_lag(stream, consumer, pending)
        await anyio.sleep(LAG_SAMPLE_EVERY_S if every_s is None else every_s)
