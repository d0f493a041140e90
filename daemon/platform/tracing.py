"""The one instrumentation seam: OpenTelemetry setup, context propagation, span export.

Nothing else in coleta knows about providers or exporters. Spans are built in one place,
``spans``, so that their names and attributes stay stable; the trace context travels in NATS
message headers (``inject`` / ``extract``). A run is followed across every hop: ticker ->
fetcher -> writer -> SQL. Metrics have their own seam, ``metrics``, on the same resource
(``resource``).

We always build an SDK ``TracerProvider``, even without an exporter, because the trace id
of a run is stored in the database; an exporter (and its batch thread) exists only when an
OTLP endpoint is configured through the standard ``OTEL_*`` variables.

Secrets must never reach a span: ``spans`` records exceptions through ``redact.redact_text``
(an ``httpx`` error message carries the full URL, query string included), and the exporter
sends every span through it again (``redacting``), whoever set its attributes.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Literal

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
)
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Span, Status
from opentelemetry.util.types import AttributeValue

from daemon import __version__
from daemon.platform.redact import redact_text

__all__ = [
    "BODY_SIZE",
    "COLETA_RUN_ID",
    "COLETA_SOURCE",
    "CONSUMER_GROUP",
    "DB_BATCH_SIZE",
    "DB_COLLECTION",
    "DB_NAMESPACE",
    "DB_OPERATION",
    "DB_QUERY_SUMMARY",
    "DB_STATUS_CODE",
    "DB_SYSTEM",
    "DESTINATION",
    "MESSAGE_COUNT",
    "MESSAGE_ID",
    "MESSAGING_SYSTEM",
    "OPERATION_NAME",
    "OPERATION_TYPE",
    "SPAN_QUEUE_SIZE",
    "SYSTEM",
    "TRACER_NAME",
    "extract",
    "inject",
    "otlp_protocol",
    "redacting",
    "resource",
    "setup_tracing",
    "shutdown_tracing",
    "span_id_hex",
    "trace_id_hex",
    "tracer",
    "use_provider",
]

# -- stable names ------------------------------------------------------------------------
# Messaging semantic conventions (development status; ``messaging.operation`` is
# deprecated in favour of ``messaging.operation.type``). NATS has no official
# ``messaging.system`` value yet.
TRACER_NAME = "coleta"
MESSAGING_SYSTEM = "nats"
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
BODY_SIZE = "messaging.message.body.size"
MESSAGE_COUNT = "messaging.batch.message_count"
COLETA_SOURCE = "coleta.source"
COLETA_RUN_ID = "coleta.run_id"
# Database client semantic conventions (stable), PostgreSQL flavour.
DB_SYSTEM = "db.system.name"
DB_OPERATION = "db.operation.name"
DB_COLLECTION = "db.collection.name"
DB_NAMESPACE = "db.namespace"
DB_BATCH_SIZE = "db.operation.batch.size"
DB_QUERY_SUMMARY = "db.query.summary"
DB_STATUS_CODE = "db.response.status_code"

_PROTOCOLS = ("grpc", "http/protobuf")


# -- provider lifecycle --------------------------------------------------------------------
class _State:
    """Module state: which provider our tracer comes from and whether setup ran."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.provider: TracerProvider | None = None
        self.tracer: tuple[TracerProvider, trace.Tracer] | None = None  # cache, see tracer()
        self.configured = False  # setup_tracing or use_provider ran; setup is then a no-op
        self.version = ""


_state = _State()


def setup_tracing(service_name: str = "coleta", version: str = __version__) -> None:
    """Build the SDK provider from the standard ``OTEL_*`` variables; idempotent.

    ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` win over the arguments, which are
    only defaults. The sampler comes from ``OTEL_TRACES_SAMPLER`` / ``_ARG`` (the SDK reads
    them when no sampler is given; default ``parentbased_always_on``). Without an OTLP
    endpoint no span processor is added at all, so spans cost only their ids.
    """
    with _state.lock:
        if _state.configured:
            return
        resource = _resource(service_name, version)
        exporter = _exporter_from_env()
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if exporter is not None:
            provider.add_span_processor(
                BatchSpanProcessor(redacting(exporter), max_queue_size=_span_queue_size())
            )
        if _state.provider is not None:
            _state.provider.shutdown()
        _state.provider, _state.configured, _state.version = provider, True, version
    # Libraries (httpx, psycopg instrumentations) use the global provider, which OTel lets
    # a process set only once; a second attempt only logs a warning, so we skip it.
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)


#: Spans waiting for export. The SDK's default (2,048) drops spans when 10,000 sources tick at
#: one instant (two spans each); ``OTEL_BSP_MAX_QUEUE_SIZE`` still wins.
SPAN_QUEUE_SIZE = 32_768


def _span_queue_size() -> int | None:
    return None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else SPAN_QUEUE_SIZE


def use_provider(provider: TracerProvider) -> None:
    """Install ``provider`` (tests: one with an in-memory exporter) instead of ours.

    The provider it replaces is shut down; the global provider is left alone. Later
    ``setup_tracing`` calls are no-ops until ``shutdown_tracing``.
    """
    with _state.lock:
        old = _state.provider
        _state.provider, _state.configured = provider, True
    if old is not None and old is not provider:
        old.shutdown()


def shutdown_tracing(timeout_s: float = 5.0) -> None:
    """Flush pending spans and shut the provider down, within ``timeout_s``.

    Safe without setup and safe twice. Afterwards ``setup_tracing`` may run again, and
    ``tracer()`` keeps working (on a fresh provider without exporter) so late spans of a
    stopping stage do not fail.
    """
    with _state.lock:
        provider, _state.provider, _state.configured = _state.provider, None, False
    if provider is None:
        return
    # Bounded from outside: the SDK's force_flush ignores its timeout (upstream issue
    # opentelemetry-python#4568) and blocks for the exporter's own timeout (10 s) when the
    # collector does not answer; shutdown waits up to 30 s more. A daemon thread that is
    # still stuck does not hold up process exit.
    closer = threading.Thread(
        target=_flush_and_shutdown,
        args=(provider, timeout_s),
        name="otel-shutdown",
        daemon=True,
    )
    closer.start()
    closer.join(timeout_s)


def _flush_and_shutdown(provider: TracerProvider, timeout_s: float) -> None:
    provider.force_flush(timeout_millis=int(timeout_s * 1000))
    provider.shutdown()


# Our providers skip the SDK's own exit hook (an unbounded flush: ~10 s per stuck export)
# and are flushed by this bounded one instead, in case the entry point did not.
atexit.register(shutdown_tracing)


def _reset_for_tests() -> None:
    """Forget all state so each test starts from "setup_tracing was never called"."""
    shutdown_tracing(timeout_s=1.0)


def tracer() -> trace.Tracer:
    """The coleta tracer from our provider, never from the set-once global provider.

    Called before ``setup_tracing`` it still gives real, recorded spans (from a provider
    without exporter), because run trace ids are stored even when nothing is exported.
    Call it where a span starts rather than caching it at import time.
    """
    cached = _state.tracer
    if cached is not None and cached[0] is _state.provider:
        return cached[1]
    with _state.lock:
        if _state.provider is None:
            _state.provider = TracerProvider(resource=_resource("coleta", __version__))
        provider = _state.provider
        # Cached because the SDK's get_tracer edits the global warning filters on every
        # call (and costs ~10 us); keyed by provider so use_provider takes effect at once.
        _state.tracer = provider, provider.get_tracer(TRACER_NAME, _state.version or None)
        return _state.tracer[1]


def resource(service_name: str = "coleta", version: str = __version__) -> Resource:
    """Environment resource, with our name and version as defaults only (metrics use it too)."""
    return _resource(service_name, version)


def _resource(service_name: str, version: str) -> Resource:
    """Environment resource, with our name and version as defaults only."""
    detected = Resource.create()
    attributes = dict(detected.attributes)
    # Resource.create fills "unknown_service:<exe>" when the environment names nothing.
    if str(attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attributes[SERVICE_NAME] = service_name
    attributes.setdefault(SERVICE_VERSION, version)
    return Resource(attributes, detected.schema_url)


#: Per signal: its own endpoint, exporter and protocol variables.
_SIGNAL_ENV = {
    "traces": (
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
        OTEL_TRACES_EXPORTER,
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    ),
    "metrics": (
        OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
        OTEL_METRICS_EXPORTER,
        OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    ),
}


def otlp_protocol(signal: Literal["traces", "metrics"]) -> str | None:
    """The OTLP protocol the environment asks ``signal`` to be exported with (``grpc`` or
    ``http/protobuf``), or None when it names no endpoint or sets the exporter to ``none``.

    The exporter classes read the endpoint, headers, timeout and TLS variables themselves;
    only the protocol choice is left to us (the SDK reads it in auto-configuration only).
    """
    env = os.environ
    endpoint, exporter, own_protocol = _SIGNAL_ENV[signal]
    if not (env.get(endpoint) or env.get(OTEL_EXPORTER_OTLP_ENDPOINT)):
        return None
    if "none" in {name.strip().lower() for name in env.get(exporter, "").split(",")}:
        return None
    protocol = (env.get(own_protocol) or env.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "grpc").strip()
    if protocol not in _PROTOCOLS:
        noun = "trace" if signal == "traces" else signal
        raise ValueError(
            f"OTLP {noun} protocol {protocol!r} is not supported; use one of {_PROTOCOLS}"
        )
    return protocol


def _exporter_from_env() -> SpanExporter | None:
    """The OTLP exporter the environment asks for, or None when it names no endpoint."""
    protocol = otlp_protocol("traces")
    # Imported here: grpc adds ~0.25 s to start-up and most runs export nothing.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    return None


# -- propagation -------------------------------------------------------------------------
def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Write the current trace context (W3C ``traceparent``/``tracestate``) into headers.

    Uses the global propagator (``OTEL_PROPAGATORS``, W3C trace context and baggage by
    default). Returns the given dict, or a new one.
    """
    carrier: dict[str, str] = {} if headers is None else headers
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> Context:
    """Read a trace context from message headers; an empty context when there is none.

    NATS headers are case-sensitive while the propagator looks up lower-case names.
    """
    carrier = {key.lower(): value for key, value in (headers or {}).items()}
    return propagate.extract(carrier)


def trace_id_hex(span: Span | None = None) -> str | None:
    """The 32-hex trace id of ``span`` (default: the current one), None if invalid."""
    context = (span or trace.get_current_span()).get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def span_id_hex(span: Span | None = None) -> str | None:
    """The 16-hex span id of ``span`` (default: the current one), None if invalid."""
    context = (span or trace.get_current_span()).get_span_context()
    return trace.format_span_id(context.span_id) if context.is_valid else None


# -- export ------------------------------------------------------------------------------
class _RedactingExporter(SpanExporter):
    """Spans as ``exporter`` sends them: name, attributes, events, links and status through
    ``redact_text``, whoever set them (a library's instrumentation included)."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([_redacted(span) for span in spans])

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def redacting(exporter: SpanExporter) -> SpanExporter:
    """``exporter``, sending every span through the redactor first (``setup_tracing`` wraps
    the OTLP exporter in it; a test may wrap its own)."""
    return _RedactingExporter(exporter)


def _redacted(span: ReadableSpan) -> ReadableSpan:
    status = span.status
    return ReadableSpan(
        name=redact_text(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_redacted_attributes(span.attributes),
        events=[
            Event(event.name, _redacted_attributes(event.attributes), event.timestamp)
            for event in span.events
        ],
        links=[Link(link.context, _redacted_attributes(link.attributes)) for link in span.links],
        kind=span.kind,
        status=Status(
            status.status_code,
            redact_text(status.description) if status.description is not None else None,
        ),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _redacted_attributes(
    attributes: Mapping[str, AttributeValue] | None,
) -> dict[str, AttributeValue] | None:
    if attributes is None:
        return None
    return {key: _redacted_value(value) for key, value in attributes.items()}


def _redacted_value(value: AttributeValue) -> AttributeValue:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Sequence) and any(isinstance(item, str) for item in value):
        return tuple(redact_text(item) if isinstance(item, str) else item for item in value)
    return value
