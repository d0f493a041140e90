"""Metrics: the instruments coleta records, behind one seam, exported like the traces.

Every stage records through the small ``record_*`` functions below, so names, units and
attributes stay stable; nothing else knows about meters or exporters. Attribute names follow
the OpenTelemetry semantic conventions where one exists (``http.client.request.duration``,
``error.type``, ``messaging.*``); coleta's own are ``coleta.*``.

===================================  =========  ============  =====================================
name                                 kind       unit          attributes
===================================  =========  ============  =====================================
``coleta.runs``                      counter    ``{run}``     source, outcome, trigger, error.type
``http.client.request.duration``     histogram  ``s``         source, method, status, server, error
``http.client.response.body.size``   histogram  ``By``        source, method, status, server
``coleta.fetch.retries``             counter    ``{retry}``   source, error.type
``coleta.dead_letters``              counter    ``{message}`` source, error.type, stage
``coleta.writer.rows``               counter    ``{row}``     source
``coleta.writer.batch.size``         histogram  ``{message}`` consumer group, outcome
``coleta.writer.batch.duration``     histogram  ``s``         consumer group, outcome
``coleta.schedule.lateness``         histogram  ``s``         source, trigger
``coleta.consumer.lag``              gauge      ``{message}`` messaging system, stream, consumer
===================================  =========  ============  =====================================

Instruments record whenever something reads them: the OTLP exporter (every
``OTEL_METRIC_EXPORT_INTERVAL`` ms, and once more at shutdown), which exists only when the
standard ``OTEL_*`` variables name an endpoint and ``OTEL_METRICS_EXPORTER`` is not ``none``,
or a test's in-memory reader (``use_reader``). With neither, every ``record_*`` call returns
at once and the consumer-lag sampler does not poll.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio
import nats.errors
from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.util.types import AttributeValue

from daemon import _tracing
from daemon._logging import get_logger

if TYPE_CHECKING:
    from nats.micro.service import Service as MicroService

    from daemon._bus import Bus

__all__ = [
    "BATCH_DURATION",
    "BATCH_SIZE",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "FETCH_RETRIES",
    "HTTP_DURATION",
    "HTTP_RESPONSE_SIZE",
    "LAG_SAMPLE_EVERY_S",
    "METER_NAME",
    "OUTCOME",
    "ROWS",
    "RUNS",
    "SCHEDULE_LATENESS",
    "BatchOutcome",
    "Outcome",
    "count_service_error",
    "record_batch",
    "record_dead_letter",
    "record_http_request",
    "record_lateness",
    "record_retry",
    "record_rows",
    "record_run",
    "sample_consumer_lag",
    "set_consumer_lag",
    "setup_metrics",
    "shutdown_metrics",
    "use_reader",
]

log = get_logger("metrics")

# -- stable names ------------------------------------------------------------------------
METER_NAME = "coleta"
RUNS = "coleta.runs"
HTTP_DURATION = "http.client.request.duration"
HTTP_RESPONSE_SIZE = "http.client.response.body.size"
FETCH_RETRIES = "coleta.fetch.retries"
DEAD_LETTERS = "coleta.dead_letters"
ROWS = "coleta.writer.rows"
BATCH_SIZE = "coleta.writer.batch.size"
BATCH_DURATION = "coleta.writer.batch.duration"
SCHEDULE_LATENESS = "coleta.schedule.lateness"
CONSUMER_LAG = "coleta.consumer.lag"

OUTCOME = "coleta.outcome"
TRIGGER = "coleta.trigger"
STAGE = "coleta.stage"
ERROR_TYPE = "error.type"

#: How a run ended, as counted by ``coleta.runs``.
Outcome = Literal["stored", "unchanged", "failed", "missed"]
#: How a writer batch ended: one transaction, split into one per message, or put back.
BatchOutcome = Literal["committed", "split", "store_unavailable"]

#: How often the lag of each durable consumer is asked of JetStream.
LAG_SAMPLE_EVERY_S = 10.0
_LAG_QUERY_TIMEOUT_S = 2.0

# Bucket boundaries. HTTP durations: the semantic conventions' own. Lateness runs from a
# timer's jitter to a catch-up a day late.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
_BYTES_BUCKETS = tuple(float(4**n) for n in range(4, 14))  # 256 B … 64 MiB
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_LATENESS_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400,
)  # fmt: skip

_PROTOCOLS = ("grpc", "http/protobuf")


class _Instruments:
    """The instruments of one meter; rebuilt whenever the provider changes."""

    def __init__(self, meter: Meter) -> None:
        self.runs: Counter = meter.create_counter(
            RUNS, unit="{run}", description="Runs that reached an outcome, by outcome."
        )
        self.http_duration: Histogram = meter.create_histogram(
            HTTP_DURATION,
            unit="s",
            description="Duration of the HTTP request of a run, body read included.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.http_size: Histogram = meter.create_histogram(
            HTTP_RESPONSE_SIZE,
            unit="By",
            description="Size of a successful response body.",
            explicit_bucket_boundaries_advisory=_BYTES_BUCKETS,
        )
        self.retries: Counter = meter.create_counter(
            FETCH_RETRIES, unit="{retry}", description="Fetch attempts handed back to retry."
        )
        self.dead_letters: Counter = meter.create_counter(
            DEAD_LETTERS, unit="{message}", description="Messages put in the dead-letter stream."
        )
        self.rows: Counter = meter.create_counter(
            ROWS, unit="{row}", description="collected_data rows in committed batches."
        )
        self.batch_size: Histogram = meter.create_histogram(
            BATCH_SIZE,
            unit="{message}",
            description="Messages per writer batch.",
            explicit_bucket_boundaries_advisory=_BATCH_BUCKETS,
        )
        self.batch_duration: Histogram = meter.create_histogram(
            BATCH_DURATION,
            unit="s",
            description="Time to write a batch: transaction, acks and any retry one by one.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.lateness: Histogram = meter.create_histogram(
            SCHEDULE_LATENESS,
            unit="s",
            description="How long after its slot a run was queued.",
            explicit_bucket_boundaries_advisory=_LATENESS_BUCKETS,
        )
        meter.create_observable_gauge(
            CONSUMER_LAG,
            callbacks=[_observe_lag],
            unit="{message}",
            description="Messages a durable consumer has not acked: pending plus unacked.",
        )


class _State:
    """Module state: our provider, its instruments, and the last sampled consumer lags."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.provider: MeterProvider | None = None
        self.instruments: _Instruments | None = None
        self.configured = False  # setup_metrics or use_reader ran; setup is then a no-op
        self.reading = False  # the provider has a reader: something collects what we record
        #: (stream, consumer) → messages not yet acked, as last sampled.
        self.lag: dict[tuple[str, str], int] = {}


_state = _State()


# -- provider lifecycle --------------------------------------------------------------------
def setup_metrics(service_name: str = "coleta", version: str = "0.1.0") -> None:
    """Build the SDK meter provider from the standard ``OTEL_*`` variables; idempotent.

    Resource as for traces (``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` win). The
    export interval is ``OTEL_METRIC_EXPORT_INTERVAL`` (ms, default 60000), read by the SDK.
    """
    with _state.lock:
        if _state.configured:
            return
        reader = _reader_from_env()
        _install(
            MeterProvider(
                metric_readers=[reader] if reader is not None else [],
                resource=_tracing.resource(service_name, version),
                shutdown_on_exit=False,
            )
        )
        _state.reading = reader is not None


def use_reader(reader: MetricReader) -> None:
    """Record into ``reader`` (tests: an ``InMemoryMetricReader``) instead of ours.

    Later ``setup_metrics`` calls are no-ops until ``shutdown_metrics``.
    """
    with _state.lock:
        _install(MeterProvider(metric_readers=[reader], shutdown_on_exit=False))
        _state.reading = True


def _install(provider: MeterProvider) -> None:
    """Swap providers (under the lock); the old one is shut down without waiting for it."""
    old = _state.provider
    _state.provider = provider
    _state.instruments = _Instruments(provider.get_meter(METER_NAME))
    _state.configured = True
    _state.lag = {}
    if old is not None:
        _close_in_background(old, 1.0)


def shutdown_metrics(timeout_s: float = 5.0) -> None:
    """Export what was recorded one last time and shut the provider down, within
    ``timeout_s``. Safe without setup and safe twice; recording is a no-op afterwards."""
    with _state.lock:
        provider, _state.provider, _state.instruments = _state.provider, None, None
        _state.configured = _state.reading = False
        _state.lag = {}
    if provider is not None:
        _close_in_background(provider, timeout_s).join(timeout_s)


def _close_in_background(provider: MeterProvider, timeout_s: float) -> threading.Thread:
    # A periodic reader's shutdown collects and exports once more. Bounded from outside, as
    # for traces: an exporter stuck on a silent collector must not hold up the exit.
    closer = threading.Thread(
        target=_shutdown_quietly,
        args=(provider, timeout_s),
        name="otel-metrics-shutdown",
        daemon=True,
    )
    closer.start()
    return closer


def _shutdown_quietly(provider: MeterProvider, timeout_s: float) -> None:
    with contextlib.suppress(Exception):  # the SDK raises when a reader failed; logged by it
        provider.shutdown(timeout_millis=timeout_s * 1000)


atexit.register(shutdown_metrics)


def _reset_for_tests() -> None:
    """Forget all state so each test starts from "setup_metrics was never called"."""
    shutdown_metrics(timeout_s=1.0)


def _live() -> _Instruments | None:
    """The instruments, or None when nothing reads them: recording is then a no-op."""
    return _state.instruments if _state.reading else None


def _reader_from_env() -> MetricReader | None:
    """The periodic OTLP reader the environment asks for, or None when it names no endpoint."""
    env = os.environ
    if not (env.get(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT) or env.get(OTEL_EXPORTER_OTLP_ENDPOINT)):
        return None
    exporters = {name.strip().lower() for name in env.get(OTEL_METRICS_EXPORTER, "").split(",")}
    if "none" in exporters:
        return None
    protocol = env.get(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL) or env.get(OTEL_EXPORTER_OTLP_PROTOCOL)
    protocol = (protocol or "grpc").strip()
    # Imported here: grpc adds ~0.25 s to start-up and most runs export nothing.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return PeriodicExportingMetricReader(GrpcExporter())
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpExporter,
        )

        return PeriodicExportingMetricReader(HttpExporter())
    raise ValueError(
        f"OTLP metrics protocol {protocol!r} is not supported; use one of {_PROTOCOLS}"
    )


# -- recording -----------------------------------------------------------------------------
def _attributes(values: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    return {key: value for key, value in values.items() if value is not None}


def record_run(
    source: str, outcome: Outcome, *, trigger: str | None = None, error_type: str | None = None
) -> None:
    """A run reached ``outcome`` (counted by the writer once it is committed)."""
    if (found := _live()) is None:
        return
    found.runs.add(
        1,
        _attributes(
            {
                _tracing.COLETA_SOURCE: source,
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
    if (found := _live()) is None:
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
            _tracing.COLETA_SOURCE: source,
        }
    )
    found.http_duration.record(duration_s, attributes)
    if body_bytes is not None and error_type is None:
        found.http_size.record(body_bytes, attributes)


def record_retry(source: str, error_type: str) -> None:
    """A failed attempt was handed back to be tried again."""
    if (found := _live()) is not None:
        found.retries.add(1, {_tracing.COLETA_SOURCE: source, ERROR_TYPE: error_type})


def record_dead_letter(source: str, error_type: str, *, stage: str) -> None:
    """A message went to the dead-letter stream; ``stage`` is ``fetcher`` or ``writer``."""
    if (found := _live()) is not None:
        found.dead_letters.add(
            1, {_tracing.COLETA_SOURCE: source, ERROR_TYPE: error_type, STAGE: stage}
        )


def record_rows(source: str, count: int) -> None:
    """``count`` collected_data rows of ``source`` were in a committed transaction (a
    replayed page that ``ON CONFLICT`` skipped counts too)."""
    if count and (found := _live()) is not None:
        found.rows.add(count, {_tracing.COLETA_SOURCE: source})


def record_batch(consumer: str, *, size: int, duration_s: float, outcome: BatchOutcome) -> None:
    """A writer batch of ``size`` messages from durable ``consumer`` ended with ``outcome``."""
    if (found := _live()) is None:
        return
    attributes = {_tracing.CONSUMER_GROUP: consumer, OUTCOME: outcome}
    found.batch_size.record(size, attributes)
    found.batch_duration.record(duration_s, attributes)


def record_lateness(source: str, lateness_s: float, *, trigger: str) -> None:
    """A slot's run was queued ``lateness_s`` after the slot (``schedule`` or ``catchup``)."""
    if (found := _live()) is not None:
        found.lateness.record(
            max(0.0, lateness_s), {_tracing.COLETA_SOURCE: source, TRIGGER: trigger}
        )


# -- consumer lag ----------------------------------------------------------------------------
def set_consumer_lag(stream: str, consumer: str, pending: int | None) -> None:
    """The gauge's next value for one consumer; None forgets it (it could not be read)."""
    if pending is None:
        _state.lag.pop((stream, consumer), None)
    else:
        _state.lag[(stream, consumer)] = pending


def _observe_lag(options: CallbackOptions) -> Iterable[Observation]:
    # Runs in the exporter's thread: read a copy, never the dict being written.
    for (stream, consumer), pending in list(_state.lag.items()):
        yield Observation(
            pending,
            {
                _tracing.SYSTEM: _tracing.MESSAGING_SYSTEM,
                _tracing.DESTINATION: stream,
                _tracing.CONSUMER_GROUP: consumer,
            },
        )


async def sample_consumer_lag(bus: Bus, *, every_s: float | None = None) -> None:
    """Ask JetStream for each durable consumer's backlog every ``every_s`` (default
    ``LAG_SAMPLE_EVERY_S``), for the ``coleta.consumer.lag`` gauge; runs until cancelled.

    Returns at once when nothing reads the metrics (no exporter configured, no test reader).
    Every replica reports the same server-side numbers: aggregate them with max, not sum.
    """
    if not _state.reading:
        return
    s = bus.subjects
    consumers = (
        (s.collect_stream, s.fetcher_consumer),
        (s.collect_stream, s.runs_consumer),
        (s.raw_stream, s.writer_consumer),
    )
    while True:
        for stream, consumer in consumers:
            try:
                info = await bus.js.consumer_info(stream, consumer, timeout=_LAG_QUERY_TIMEOUT_S)
            except (nats.errors.Error, TimeoutError) as exc:
                set_consumer_lag(stream, consumer, None)
                log.debug(
                    "metrics.lag_unavailable",
                    extra={"consumer": consumer, "error": str(exc) or type(exc).__name__},
                )
                continue
            set_consumer_lag(
                stream, consumer, (info.num_pending or 0) + (info.num_ack_pending or 0)
            )
        await anyio.sleep(LAG_SAMPLE_EVERY_S if every_s is None else every_s)


# -- nats micro stats --------------------------------------------------------------------------
def count_service_error(service: MicroService, endpoint: str, code: str, message: str) -> None:
    """Count an error reply in ``$SRV.STATS`` (``nats micro stats``) for ``endpoint``.

    nats-py counts an error only when the handler raises, and then answers by itself with an
    empty body and ``repr(exc)``. A handler that answers with ``request.respond_error`` (to
    send a body) leaves ``num_errors`` at 0, unlike the Go micro library, whose
    ``Request.Error`` counts. nats-py has no public hook for this, hence the private
    attributes; if they change, this does nothing rather than fail the reply.
    """
    endpoints: Any = getattr(service, "_endpoints", ())
    for found in endpoints:
        if getattr(found, "_name", None) != endpoint or not hasattr(found, "_num_errors"):
            continue
        found._num_errors += 1
        found._last_error = f"{code}:{message}"  # what nats-py stores for a ServiceError
        return
