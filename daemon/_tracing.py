"""The one instrumentation seam: OpenTelemetry setup, context propagation, redaction.

Nothing else in coleta knows about exporters. Every stage asks this module for spans
(``producer_span``, ``consumer_span``, ``batch_span``, ``db_span``) so that span names and
attributes stay stable, and carries the trace context in NATS message headers with
``inject`` / ``extract``. A run is followed across every hop: ticker -> fetcher -> writer
-> SQL. Metrics have their own seam, ``_metrics``, on the same resource (``resource``).

We always build an SDK ``TracerProvider``, even without an exporter, because the trace id
of a run is stored in the database; an exporter (and its batch thread) exists only when an
OTLP endpoint is configured through the standard ``OTEL_*`` variables.

Secrets must never reach a span or a log line: ``redact_url``, ``redact_headers`` and
``redact_text`` are the only scrubbers, and the span helpers record exceptions through
them (an ``httpx`` error message carries the full URL, query string included).
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
)
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

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
    "REDACTED",
    "SYSTEM",
    "TRACER_NAME",
    "batch_span",
    "consumer_span",
    "db_span",
    "end_send",
    "extract",
    "inject",
    "producer_span",
    "record_error",
    "redact_headers",
    "redact_text",
    "redact_url",
    "resource",
    "setup_tracing",
    "shutdown_tracing",
    "span_id_hex",
    "start_send",
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

REDACTED = "REDACTED"

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


def setup_tracing(service_name: str = "coleta", version: str = "0.1.0") -> None:
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
                BatchSpanProcessor(exporter, max_queue_size=_span_queue_size())
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
            _state.provider = TracerProvider(resource=_resource("coleta", "0.1.0"))
        provider = _state.provider
        # Cached because the SDK's get_tracer edits the global warning filters on every
        # call (and costs ~10 us); keyed by provider so use_provider takes effect at once.
        _state.tracer = provider, provider.get_tracer(TRACER_NAME, _state.version or None)
        return _state.tracer[1]


def resource(service_name: str = "coleta", version: str = "0.1.0") -> Resource:
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


def _exporter_from_env() -> SpanExporter | None:
    """The OTLP exporter the environment asks for, or None when it names no endpoint.

    The exporter classes read the endpoint, headers, timeout and TLS variables themselves;
    only the protocol choice is left to us (the SDK reads it in auto-configuration only).
    """
    env = os.environ
    if not (env.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or env.get(OTEL_EXPORTER_OTLP_ENDPOINT)):
        return None
    exporters = {name.strip().lower() for name in env.get(OTEL_TRACES_EXPORTER, "").split(",")}
    if "none" in exporters:
        return None
    protocol = env.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or env.get(OTEL_EXPORTER_OTLP_PROTOCOL)
    protocol = (protocol or "grpc").strip()
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
    raise ValueError(f"OTLP trace protocol {protocol!r} is not supported; use one of {_PROTOCOLS}")


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


# -- spans -------------------------------------------------------------------------------
def producer_span(
    subject: str,
    *,
    source: str,
    run_id: str,
    message_id: str | None = None,
    body_size: int | None = None,
) -> AbstractContextManager[Span]:
    """``send <subject>``: the span whose context a published message carries."""
    attributes = _send_attributes(subject, source, run_id, message_id, body_size)
    return _span(f"send {subject}", kind=SpanKind.PRODUCER, attributes=attributes)


def _send_attributes(
    subject: str, source: str, run_id: str, message_id: str | None, body_size: int | None
) -> dict[str, AttributeValue]:
    """The attributes of a ``send <subject>`` producer span."""
    return _attributes(
        {
            SYSTEM: MESSAGING_SYSTEM,
            OPERATION_TYPE: "send",
            OPERATION_NAME: "send",
            DESTINATION: subject,
            MESSAGE_ID: message_id,
            BODY_SIZE: body_size,
            COLETA_SOURCE: source,
            COLETA_RUN_ID: run_id,
        }
    )


def consumer_span(
    subject: str,
    headers: Mapping[str, str] | None,
    *,
    consumer: str,
    source: str | None = None,
    run_id: str | None = None,
    message_id: str | None = None,
    body_size: int | None = None,
    operation: str = "process",
) -> AbstractContextManager[Span]:
    """``<operation> <subject>``, a child of the producer span found in ``headers``.

    Without a trace context in the headers the span starts a new trace rather than
    joining whatever span happens to be current.
    """
    attributes = _attributes(
        {
            SYSTEM: MESSAGING_SYSTEM,
            OPERATION_TYPE: operation,
            OPERATION_NAME: operation,
            DESTINATION: subject,
            CONSUMER_GROUP: consumer,
            MESSAGE_ID: message_id,
            BODY_SIZE: body_size,
            COLETA_SOURCE: source,
            COLETA_RUN_ID: run_id,
        }
    )
    return _span(
        f"{operation} {subject}",
        kind=SpanKind.CONSUMER,
        context=extract(headers),
        attributes=attributes,
    )


def batch_span(
    name: str,
    links_from: Iterable[Mapping[str, str] | None],
    *,
    kind: SpanKind = SpanKind.CONSUMER,
    attributes: Mapping[str, AttributeValue | None] | None = None,
    **extra: AttributeValue | None,
) -> AbstractContextManager[Span]:
    """A span over many messages, linked to each message's producer span.

    It carries one link per message with a valid trace context, and is a child of the
    current span. Without one, a batch whose messages all belong to one trace (a run's
    events, written together) joins that trace under the first message's producer span, so
    the run's trace shows the write and its SQL; a batch of several traces is a root.
    Keys of ``attributes`` and ``extra`` are used as given (dotted names go in
    ``attributes``: mypy rejects
    ``**{"coleta.x": 1}`` next to ``kind``); None values are skipped. Links beyond
    ``OTEL_SPAN_LINK_COUNT_LIMIT`` (128 by default) are dropped by the SDK.
    """
    links: list[Link] = []
    count = 0
    for headers in links_from:
        count += 1
        context = trace.get_current_span(extract(headers)).get_span_context()
        if context.is_valid:
            links.append(Link(context))
    merged = _attributes(
        {SYSTEM: MESSAGING_SYSTEM, MESSAGE_COUNT: count, **(attributes or {}), **extra}
    )
    parent: Context | None = None
    if (
        links
        and not trace.get_current_span().get_span_context().is_valid
        and len({link.context.trace_id for link in links}) == 1
    ):
        parent = trace.set_span_in_context(trace.NonRecordingSpan(links[0].context))
    return _span(name, kind=kind, attributes=merged, links=links, context=parent)


@contextmanager
def db_span(
    operation: str,
    collection: str,
    *,
    batch_size: int = 1,
    namespace: str | None = None,
    server_address: str | None = None,
    server_port: int | None = None,
) -> Iterator[Span]:
    """A CLIENT span for one SQL statement, named per the database conventions.

    ``db_span("INSERT", "collected_data", batch_size=n)`` is ``INSERT collected_data`` for
    one parameter set; an ``executemany`` of two or more is the batch operation
    ``BATCH INSERT collected_data`` with ``db.operation.batch.size``. A failure records the
    SQLSTATE (``db.response.status_code``) and ``error.type``; the message goes through the
    redactor like every recorded error.
    """
    if batch_size >= 2:
        operation = f"BATCH {operation}"
    summary = f"{operation} {collection}"
    attributes = _attributes(
        {
            DB_SYSTEM: "postgresql",
            DB_OPERATION: operation,
            DB_COLLECTION: collection,
            DB_QUERY_SUMMARY: summary,
            DB_NAMESPACE: namespace,
            DB_BATCH_SIZE: batch_size if batch_size >= 2 else None,
            "server.address": server_address,
            "server.port": server_port,
        }
    )
    with _span(summary, kind=SpanKind.CLIENT, attributes=attributes) as span:
        try:
            yield span
        except Exception as exc:
            sqlstate = getattr(exc, "sqlstate", None)
            if isinstance(sqlstate, str):
                span.set_attribute(DB_STATUS_CODE, sqlstate)
            span.set_attribute("error.type", sqlstate or type(exc).__qualname__)
            raise


@contextmanager
def _span(
    name: str,
    *,
    kind: SpanKind,
    attributes: dict[str, AttributeValue],
    context: Context | None = None,
    links: list[Link] | None = None,
) -> Iterator[Span]:
    """Start a current span that records a body's exception through the redactor."""
    # The SDK's own recording would store str(exc) and the traceback verbatim.
    with tracer().start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Exception as exc:
            record_error(span, exc)
            raise


def record_error(span: Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` with secrets scrubbed, and mark the span as failed."""
    if not span.is_recording():
        return
    message = redact_text(str(exc))
    span.record_exception(
        exc,
        attributes={
            "exception.message": message,
            "exception.stacktrace": redact_text("".join(traceback.format_exception(exc))),
        },
        escaped=True,
    )
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"))


def _attributes(values: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    """Drop unset attributes: OTel rejects None values with a warning."""
    return {key: value for key, value in values.items() if value is not None}


# -- redaction ---------------------------------------------------------------------------
# Query parameter names that carry credentials: api_key, apikey, access_token,
# client_secret, X-Amz-Signature, sig (Azure SAS), password, ... Two carve-outs keep
# common harmless names readable: author(s) and keyword(s). "sig" must stand alone
# ("assignee" contains it).
_SENSITIVE_PARAM = re.compile(
    r"key(?!words?(?![a-z]))|token|secret|passw(?:or)?d|pwd|signature|(?<![a-z])sig(?![a-z])"
    r"|auth(?!ors?(?![a-z]))|credential|session|access",
    re.IGNORECASE,
)
_SENSITIVE_HEADER = re.compile(
    r"^(?:proxy-)?authorization$|^(?:set-)?cookie$|token|secret|key|auth|passw(?:or)?d"
    r"|signature|credential",
    re.IGNORECASE,
)
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>`]+", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Drop ``user:pass@`` and replace sensitive query (and fragment) values.

    Other parameters keep their order and encoding. A URL that cannot be parsed is
    replaced whole: a readable secret is worse than an unreadable log line.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # validates the netloc; raises ValueError on garbage
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            parts.path,
            _redact_query(parts.query),
            _redact_query(parts.fragment) if "=" in parts.fragment else parts.fragment,
        )
    )


def _redact_query(query: str) -> str:
    if not query:
        return query
    pairs = []
    for pair in query.split("&"):
        name, equals, _value = pair.partition("=")
        if equals and _SENSITIVE_PARAM.search(unquote_plus(name)):
            pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return "&".join(pairs)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Copy ``headers`` with credential-bearing values replaced by ``REDACTED``."""
    return {
        name: REDACTED if _SENSITIVE_HEADER.search(name) else value
        for name, value in headers.items()
    }


def redact_text(text: str) -> str:
    """Redact every URL inside free text (exception messages, tracebacks)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)


# -- runs started ahead of their publish -------------------------------------------------
def start_send(
    root_name: str,
    subject: str,
    *,
    start_ns: int,
    source: str,
    run_id: str,
    root_attributes: Mapping[str, AttributeValue],
) -> tuple[Span, Span, dict[str, str]]:
    """A new trace's root span and its ``send <subject>`` producer span, both started at
    ``start_ns``, and the headers (``Nats-Msg-Id`` = ``run_id``) carrying the producer's context.

    For work prepared before it happens (the ticker builds a burst of runs ahead of their
    slot and publishes it at the slot): neither span is current, nothing is exported until
    ``end_send``, and a prepared run that is never published is simply dropped. The spans
    have the names and attributes ``producer_span`` gives a publish inside a root span.
    """
    root = tracer().start_span(
        root_name,
        context=Context(),  # a new trace
        kind=SpanKind.INTERNAL,
        attributes=_attributes({COLETA_SOURCE: source, COLETA_RUN_ID: run_id, **root_attributes}),
        start_time=start_ns,
    )
    attributes = _send_attributes(subject, source, run_id, run_id, None)
    producer = tracer().start_span(
        f"send {subject}",
        context=trace.set_span_in_context(root, Context()),
        kind=SpanKind.PRODUCER,
        attributes=attributes,
        start_time=start_ns,
    )
    headers = {"Nats-Msg-Id": run_id}
    propagate.inject(headers, context=trace.set_span_in_context(producer, Context()))
    return root, producer, headers


def end_send(
    root: Span,
    producer: Span,
    *,
    end_ns: int,
    body_size: int | None = None,
    error: BaseException | None = None,
) -> None:
    """End the spans of ``start_send``: the publish's outcome goes on the producer span."""
    if body_size is not None:
        producer.set_attribute(BODY_SIZE, body_size)
    if error is not None:
        record_error(producer, error)
        record_error(root, error)
    producer.end(end_time=end_ns)
    root.end(end_time=end_ns)
