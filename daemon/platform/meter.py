"""The metrics provider: its lifecycle, its instruments and what they read.

``metrics`` is what the stages call; this module builds the SDK ``MeterProvider`` those calls
record into, from the standard ``OTEL_*`` variables (``setup_metrics``) or a test's reader
(``use_reader``), and shuts it down within a bound. ``OTEL_METRICS_EXPORTER`` names the
exporters, as in the SDK's auto-configuration: ``otlp`` (the default; pushes only when an
endpoint is set), ``prometheus`` (serves ``/metrics``, see ``prometheus``), both joined by a
comma, or ``none``. Instruments record only while something reads them (``live``): with no
exporter and no test reader, recording is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, NamedTuple

from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

from daemon import __version__
from daemon.errors import ConfigError
from daemon.platform import prometheus, tracing
from daemon.platform.logs import get_logger

__all__ = [
    "BATCH_DURATION",
    "BATCH_SIZE",
    "CONSECUTIVE_FAILURES",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "ERROR_TYPE",
    "FETCH_RETRIES",
    "FRESHNESS",
    "HTTP_DURATION",
    "HTTP_RESPONSE_SIZE",
    "LATE",
    "METER_NAME",
    "OUTCOME",
    "ROWS",
    "RUNS",
    "SCHEDULE_LATENESS",
    "STAGE",
    "TRIGGER",
    "BatchOutcome",
    "Instruments",
    "Outcome",
    "SourceGauges",
    "exporters",
    "live",
    "reading",
    "set_consumer_lag",
    "set_source_gauges",
    "setup_metrics",
    "shutdown_metrics",
    "use_reader",
]

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
FRESHNESS = "coleta.source.freshness"
LATE = "coleta.source.late"
CONSECUTIVE_FAILURES = "coleta.source.consecutive_failures"

OUTCOME = "coleta.outcome"
TRIGGER = "coleta.trigger"
STAGE = "coleta.stage"
ERROR_TYPE = "error.type"

#: How a run ended, as counted by ``coleta.runs``.
Outcome = Literal["stored", "unchanged", "failed", "missed"]
#: How a writer batch ended: one transaction, split into one per message, or put back.
BatchOutcome = Literal["committed", "split", "store_unavailable"]


# Bucket boundaries. HTTP durations: the semantic conventions' own. Lateness runs from a
# timer's jitter to a catch-up a day late.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
_BYTES_BUCKETS = tuple(float(4**n) for n in range(4, 14))  # 256 B … 64 MiB
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_LATENESS_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400,
)  # fmt: skip

#: What ``OTEL_METRICS_EXPORTER`` may name (comma-separated); unset means ``otlp``.
_EXPORTERS = ("otlp", "prometheus", "none")

log = get_logger("metrics")


class Instruments:
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
        meter.create_observable_gauge(
            FRESHNESS,
            callbacks=[_observe_sources(lambda g: g.age_s)],
            unit="s",
            description="Time since the source's last stored run (never stored: since first seen).",
        )
        meter.create_observable_gauge(
            LATE,
            callbacks=[_observe_sources(lambda g: int(g.late))],
            unit="{source}",
            description="1 while the source has no stored run within its freshness window.",
        )
        meter.create_observable_gauge(
            CONSECUTIVE_FAILURES,
            callbacks=[_observe_sources(lambda g: g.consecutive_failures)],
            unit="{run}",
            description="Failed runs of the source since its last stored run.",
        )


class SourceGauges(NamedTuple):
    """One source's freshness, as last evaluated (``set_source_gauges``)."""

    age_s: float
    late: bool
    consecutive_failures: int


class _State:
    """Module state: our provider, its instruments, and the last sampled consumer lags and
    source freshness."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.provider: MeterProvider | None = None
        self.endpoint: prometheus.Endpoint | None = None  # serving /metrics for this provider
        self.instruments: Instruments | None = None
        self.configured = False  # setup_metrics or use_reader ran; setup is then a no-op
        self.reading = False  # the provider has a reader: something collects what we record
        #: (stream, consumer) → messages not yet acked, as last sampled.
        self.lag: dict[tuple[str, str], int] = {}
        #: source → its gauges, as last evaluated (the whole mapping is replaced at once).
        self.sources: Mapping[str, SourceGauges] = {}


_state = _State()


# -- provider lifecycle --------------------------------------------------------------------
def setup_metrics(service_name: str = "coleta", version: str = __version__) -> None:
    """Build the SDK meter provider from the standard ``OTEL_*`` variables; idempotent.

    Resource as for traces (``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` win). The
    OTLP export interval is ``OTEL_METRIC_EXPORT_INTERVAL`` (ms, default 60000), read by the
    SDK. Raises ``ConfigError`` for an exporter it does not know, or a Prometheus address it
    cannot listen on.
    """
    with _state.lock:
        if _state.configured:
            return
        names = exporters()
        readers: list[MetricReader] = []
        # The endpoint first: a port it cannot have fails set-up before any exporter thread.
        endpoint = prometheus.open_endpoint() if "prometheus" in names else None
        if endpoint is not None:
            readers.append(endpoint.reader)
        if "otlp" in names and (otlp := _otlp_reader_from_env()) is not None:
            readers.append(otlp)
        _install(
            MeterProvider(
                metric_readers=readers,
                resource=tracing.resource(service_name, version),
                shutdown_on_exit=False,
            ),
            endpoint,
        )
        _state.reading = bool(readers)
    if endpoint is not None:
        log.info("metrics.serving", extra={"url": endpoint.url})


def exporters() -> frozenset[str]:
    """The exporters ``OTEL_METRICS_EXPORTER`` names: ``otlp`` when unset, none for ``none``."""
    raw = os.environ.get(OTEL_METRICS_EXPORTER, "")
    names = {name.strip().lower() for name in raw.split(",") if name.strip()} or {"otlp"}
    unknown = sorted(names.difference(_EXPORTERS))
    if unknown:
        raise ConfigError(
            f"{OTEL_METRICS_EXPORTER}: {unknown[0]!r} is not a metrics exporter coleta has; "
            f"use {', '.join(_EXPORTERS)} (several joined by commas)"
        )
    return frozenset() if "none" in names else frozenset(names)


def use_reader(reader: MetricReader) -> None:
    """Record into ``reader`` (tests: an ``InMemoryMetricReader``) instead of ours.

    Later ``setup_metrics`` calls are no-ops until ``shutdown_metrics``.
    """
    with _state.lock:
        _install(MeterProvider(metric_readers=[reader], shutdown_on_exit=False), None)
        _state.reading = True


def _install(provider: MeterProvider, endpoint: prometheus.Endpoint | None = None) -> None:
    """Swap providers (under the lock); the old one is shut down without waiting for it, its
    endpoint (if any) at once, so its port is free again."""
    old, old_endpoint = _state.provider, _state.endpoint
    _state.provider, _state.endpoint = provider, endpoint
    if old_endpoint is not None:
        old_endpoint.close()
    _state.instruments = Instruments(provider.get_meter(METER_NAME))
    _state.configured = True
    _state.lag = {}
    _state.sources = {}
    if old is not None:
        _close_in_background(old, 1.0)


def shutdown_metrics(timeout_s: float = 5.0) -> None:
    """Stop serving ``/metrics``, export what was recorded one last time and shut the provider
    down, within ``timeout_s``. Safe without setup and safe twice; recording is a no-op
    afterwards."""
    with _state.lock:
        provider, _state.provider, _state.instruments = _state.provider, None, None
        endpoint, _state.endpoint = _state.endpoint, None
        _state.configured = _state.reading = False
        _state.lag = {}
        _state.sources = {}
    if endpoint is not None:
        endpoint.close()
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


def live() -> Instruments | None:
    """The instruments, or None when nothing reads them: recording is then a no-op."""
    return _state.instruments if _state.reading else None


def _otlp_reader_from_env() -> MetricReader | None:
    """The periodic OTLP reader the environment asks for, or None when it names no endpoint."""
    protocol = tracing.otlp_protocol("metrics")
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
    return None


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
                tracing.SYSTEM: tracing.MESSAGING_SYSTEM,
                tracing.DESTINATION: stream,
                tracing.CONSUMER_GROUP: consumer,
            },
        )


# -- source freshness --------------------------------------------------------------------------
def set_source_gauges(sources: Mapping[str, SourceGauges]) -> None:
    """Every source's freshness gauges from now on; a source left out is no longer reported."""
    _state.sources = dict(sources)


def _observe_sources(
    value: Callable[[SourceGauges], float],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        # Runs in the exporter's thread: the mapping is replaced whole, never changed in place.
        for source, gauges in _state.sources.items():
            yield Observation(value(gauges), {tracing.COLETA_SOURCE: source})

    return observe


def reading() -> bool:
    """Whether something reads what is recorded (an exporter, a test's reader)."""
    return _state.reading
