"""Every span coleta starts, built here so that names and attributes stay stable.

Messaging spans follow the semantic conventions (``send <subject>`` PRODUCER, ``process
<subject>`` CONSUMER, a batch linked to each message's producer span); a run's root span is
``<trigger> <source>``. A run has one span per hop — the trigger (its root and the command's
``send``), the fetch (``process <collect subject>``), the write of each of its events
(``process <raw subject>``) — and the events it publishes carry the fetch span's context
rather than a producer span each; a command recorded ``queued`` is only linked from its
batch's span; the fetcher's request is an HTTP CLIENT span named by its method; a SQL
statement is a database CLIENT span (``INSERT collected_data``, ``BATCH INSERT …``). A span that
fails records its exception through the redactor (``record_error``), and the exporter sends
every span through it again (``tracing.redacting``).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from daemon.platform.redact import redact_text
from daemon.platform.tracing import (
    BODY_SIZE,
    COLETA_RUN_ID,
    COLETA_SOURCE,
    CONSUMER_GROUP,
    DB_BATCH_SIZE,
    DB_COLLECTION,
    DB_NAMESPACE,
    DB_OPERATION,
    DB_QUERY_SUMMARY,
    DB_STATUS_CODE,
    DB_SYSTEM,
    DESTINATION,
    MESSAGE_COUNT,
    MESSAGE_ID,
    MESSAGING_SYSTEM,
    OPERATION_NAME,
    OPERATION_TYPE,
    SYSTEM,
    extract,
    tracer,
)

__all__ = [
    "Span",
    "batch_span",
    "consumer_span",
    "db_span",
    "end_send",
    "end_span",
    "http_span",
    "in_trace_of",
    "message_span",
    "producer_span",
    "record_error",
    "run_span",
    "start_send",
    "write_span",
]


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
) -> AbstractContextManager[Span]:
    """A span over many messages, linked to each message's producer span.

    It carries one link per message with a valid trace context, and is a child of the
    current span. Without one, a batch whose messages all belong to one trace (a run's
    events, written together) joins that trace under the first message's producer span, so
    the run's trace shows the write and its SQL; a batch of several traces is a root.
    ``attributes`` set to None are skipped. Links beyond ``OTEL_SPAN_LINK_COUNT_LIMIT`` (128
    by default) are dropped by the SDK.
    """
    links: list[Link] = []
    count = 0
    for headers in links_from:
        count += 1
        context = trace.get_current_span(extract(headers)).get_span_context()
        if context.is_valid:
            links.append(Link(context))
    merged = _attributes({SYSTEM: MESSAGING_SYSTEM, MESSAGE_COUNT: count, **(attributes or {})})
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

    For work prepared before it happens (the ticker prepares a burst ahead of its slot):
    neither span is current, nothing is exported until ``end_send``, and a prepared run never
    published is dropped. The names and attributes are those of a ``run_span`` around a publish.
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


def run_span(
    trigger: str, source: str, *, run_id: str, scheduled_for: str
) -> AbstractContextManager[Span]:
    """``<trigger> <source>``: a new trace's root, around queueing one run's command."""
    attributes = _attributes(
        {
            COLETA_SOURCE: source,
            COLETA_RUN_ID: run_id,
            "coleta.trigger": trigger,
            "coleta.scheduled_for": scheduled_for,
        }
    )
    return _span(
        f"{trigger} {source}", kind=SpanKind.INTERNAL, attributes=attributes, context=Context()
    )


def http_span(
    method: str, url: str, host: str, *, source: str, run_id: str
) -> AbstractContextManager[Span]:
    """The CLIENT span of one request of a run, named by its method; ``url`` redacted."""
    attributes: dict[str, AttributeValue] = {"http.request.method": method, "url.full": url}
    attributes |= {"server.address": host, COLETA_SOURCE: source, COLETA_RUN_ID: run_id}
    return _span(method, kind=SpanKind.CLIENT, attributes=attributes)


def write_span(
    consumer: str, headers: Iterable[Mapping[str, str] | None]
) -> AbstractContextManager[Span]:
    """``write <consumer>``: one writer transaction, linked to each message it holds."""
    attributes = {CONSUMER_GROUP: consumer, OPERATION_TYPE: "process", DB_SYSTEM: "postgresql"}
    return batch_span(f"write {consumer}", headers, attributes=attributes)


def message_span(
    subject: str,
    headers: Mapping[str, str] | None,
    *,
    consumer: str,
    body_size: int,
    source: str,
    run_id: str,
    status: str,
) -> Span:
    """A message's own span in its run's trace, under the current (batch) span's link: the
    write shows up in the run's trace. Started, not current; ``end_span`` ends it."""
    return tracer().start_span(
        f"process {subject}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            SYSTEM: MESSAGING_SYSTEM,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "write",
            DESTINATION: subject,
            CONSUMER_GROUP: consumer,
            BODY_SIZE: body_size,
            COLETA_SOURCE: source,
            COLETA_RUN_ID: run_id,
            "coleta.run_status": status,
        },
        links=[Link(trace.get_current_span().get_span_context())],
    )


def end_span(span: Span, *, error: str | None = None) -> None:
    """End a span started with ``message_span``; ``error`` (redacted) marks it failed."""
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, redact_text(error)))
    span.end()


@contextmanager
def in_trace_of(headers: Mapping[str, str] | None, span: Span | None = None) -> Iterator[None]:
    """Log lines inside carry the trace id of ``span``, or of the message whose ``headers``
    are given (its run's trace), if it has one."""
    if span is None:
        span = trace.NonRecordingSpan(trace.get_current_span(extract(headers)).get_span_context())
    if not span.get_span_context().is_valid:
        yield
        return
    with trace.use_span(span, end_on_exit=False):
        yield
