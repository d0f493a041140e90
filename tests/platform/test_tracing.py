"""The tracing seam: propagation through NATS-style headers, span shapes, export, redaction."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import anyio
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from daemon.platform import tracing
from daemon.platform.spans import batch_span, consumer_span, producer_span
from daemon.platform.tracing import (
    extract,
    inject,
    setup_tracing,
    shutdown_tracing,
    trace_id_hex,
    tracer,
)
from tests import ROOT
from tests.fix_otlp import Received

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(autouse=True)
def _clean_tracing(no_otel_env: None) -> Iterator[None]:
    """Each test starts with no OTEL_* configuration and no provider of ours."""
    tracing._reset_for_tests()
    yield
    tracing._reset_for_tests()


@pytest.fixture
def added_processors(monkeypatch: pytest.MonkeyPatch) -> list[SpanProcessor]:
    """Every span processor any TracerProvider gets from now on."""
    added: list[SpanProcessor] = []
    original = TracerProvider.add_span_processor

    def spy(self: TracerProvider, processor: SpanProcessor) -> None:
        added.append(processor)
        original(self, processor)

    monkeypatch.setattr(TracerProvider, "add_span_processor", spy)
    return added


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [span for span in exporter.get_finished_spans() if span.name == name]
    assert len(found) == 1, [span.name for span in exporter.get_finished_spans()]
    return found[0]


# -- propagation ---------------------------------------------------------------------------
@pytest.mark.anyio
async def test_context_crosses_mixed_case_headers(spans: InMemorySpanExporter) -> None:
    with producer_span("coleta.cmd.rates", source="rates", run_id="r1") as sent:
        headers = inject({"Nats-Msg-Id": "m1"})
    assert headers["Nats-Msg-Id"] == "m1"
    # NATS keeps header case; a broker or client may hand them back capitalised.
    received = {"Nats-Msg-Id": "m1", "TraceParent": headers["traceparent"]}
    assert not trace.get_current_span(propagate.extract(received)).get_span_context().is_valid

    with consumer_span("coleta.cmd.rates", received, consumer="fetcher") as handled:
        assert trace_id_hex() == trace_id_hex(sent)

    producer, consumer = (
        only(spans, "send coleta.cmd.rates"),
        only(spans, "process coleta.cmd.rates"),
    )
    assert handled.get_span_context().trace_id == sent.get_span_context().trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.parent.is_remote


@pytest.mark.anyio
async def test_concurrent_tasks_keep_their_own_current_span(spans: InMemorySpanExporter) -> None:
    seen: dict[str, tuple[object, object]] = {}

    async def publish(run_id: str, delay: float) -> None:
        with producer_span("coleta.cmd.rates", source="rates", run_id=run_id) as span:
            await anyio.sleep(delay)
            seen[run_id] = (span, trace.get_current_span())

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish, "r1", 0.02)
        tg.start_soon(publish, "r2", 0.01)
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert all(own is current for own, current in seen.values())
    assert len(spans.get_finished_spans()) == 2


def test_extract_without_context_gives_root(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("unrelated") as outer:
        with consumer_span("raw.rates", None, consumer="writer") as handled:
            pass
        with consumer_span("raw.rates", {"Nats-Msg-Id": "x"}, consumer="writer"):
            pass
    assert handled.get_span_context().trace_id != outer.get_span_context().trace_id
    assert all(span.parent is None for span in spans.get_finished_spans())
    assert extract(None) == extract({})


def test_inject_outside_a_span_adds_nothing() -> None:
    assert inject() == {}
    headers = {"Nats-Msg-Id": "m"}
    assert inject(headers) is headers
    assert headers == {"Nats-Msg-Id": "m"}


def test_trace_id_hex() -> None:
    assert trace_id_hex() is None
    assert trace_id_hex(trace.INVALID_SPAN) is None
    with tracer().start_as_current_span("x") as span:
        current = trace_id_hex()
    assert current is not None
    assert HEX32.match(current)
    assert current == f"{span.get_span_context().trace_id:032x}"
    assert trace_id_hex(span) == current
    assert tracing.span_id_hex(span) == f"{span.get_span_context().span_id:016x}"


# -- span shapes ---------------------------------------------------------------------------
def test_producer_span_attributes(spans: InMemorySpanExporter) -> None:
    with producer_span(
        "coleta.cmd.rates", source="rates", run_id="r1", message_id="m1", body_size=42
    ):
        pass
    span = only(spans, "send coleta.cmd.rates")
    assert span.kind is SpanKind.PRODUCER
    assert dict(span.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "coleta.cmd.rates",
        "messaging.message.id": "m1",
        "messaging.message.body.size": 42,
        "coleta.source": "rates",
        "coleta.run_id": "r1",
    }


def test_consumer_span_attributes(spans: InMemorySpanExporter) -> None:
    with consumer_span(
        "raw.rates",
        None,
        consumer="writer",
        source="rates",
        run_id="r1",
        message_id="m1",
        body_size=7,
        operation="receive",
    ):
        pass
    with consumer_span("raw.rates", None, consumer="writer"):
        pass
    received, processed = only(spans, "receive raw.rates"), only(spans, "process raw.rates")
    assert received.kind is SpanKind.CONSUMER
    assert dict(received.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "receive",
        "messaging.operation.name": "receive",
        "messaging.destination.name": "raw.rates",
        "messaging.consumer.group.name": "writer",
        "messaging.message.id": "m1",
        "messaging.message.body.size": 7,
        "coleta.source": "rates",
        "coleta.run_id": "r1",
    }
    # Unknown values are left out rather than sent as empty strings.
    assert set(processed.attributes or {}) == {
        "messaging.system",
        "messaging.operation.type",
        "messaging.operation.name",
        "messaging.destination.name",
        "messaging.consumer.group.name",
    }


def test_batch_span_links_each_message(spans: InMemorySpanExporter) -> None:
    carried, sent_ids = [], []
    for run in ("r1", "r2"):
        with producer_span("raw.rates", source="rates", run_id=run) as sent:
            carried.append({"Nats-Msg-Id": run, "Traceparent": inject()["traceparent"]})
            sent_ids.append(sent.get_span_context().span_id)
    garbage = {"traceparent": "00-zz-not-a-context-01"}

    with (
        tracer().start_as_current_span("writer loop") as loop,
        batch_span(
            "process raw.rates",
            [*carried, None, garbage],
            attributes={"coleta.source": "rates", "coleta.skip": None, "rows": 2},
        ),
    ):
        pass

    span = only(spans, "process raw.rates")
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None
    assert span.parent.span_id == loop.get_span_context().span_id
    assert [link.context.span_id for link in span.links] == sent_ids
    assert dict(span.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.batch.message_count": 4,
        "coleta.source": "rates",
        "rows": 2,
    }


def test_batch_span_links_to_distinct_traces(spans: InMemorySpanExporter) -> None:
    carried = []
    for run in ("r1", "r2"):
        with producer_span("raw.rates", source="rates", run_id=run):
            carried.append(inject())
    with batch_span("process raw.rates", carried, kind=SpanKind.INTERNAL):
        pass
    batch = only(spans, "process raw.rates")
    producers = [span for span in spans.get_finished_spans() if span.name == "send raw.rates"]
    assert batch.kind is SpanKind.INTERNAL
    assert [link.context.trace_id for link in batch.links] == [
        span.context.trace_id for span in producers
    ]
    assert batch.context.trace_id not in {span.context.trace_id for span in producers}


def test_failing_body_marks_span_and_redacts_the_error(spans: InMemorySpanExporter) -> None:
    url = "https://bob:hunter2@api.example/v1?api_key=s3cr3t&city=Lisbon"
    with (
        pytest.raises(RuntimeError, match="s3cr3t"),
        producer_span("coleta.cmd.rates", source="rates", run_id="r1"),
    ):
        raise RuntimeError(f"fetch failed for url '{url}'")
    span = only(spans, "send coleta.cmd.rates")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is not None
    assert "s3cr3t" not in span.status.description
    (event,) = span.events
    attributes = dict(event.attributes or {})
    assert event.name == "exception"
    assert attributes["exception.type"] == "RuntimeError"
    assert "api_key=REDACTED&city=Lisbon" in str(attributes["exception.message"])
    assert "test_failing_body" in str(attributes["exception.stacktrace"])
    assert "s3cr3t" not in repr(attributes)
    assert "hunter2" not in repr(attributes)


def test_cancellation_is_not_an_error(spans: InMemorySpanExporter) -> None:
    with pytest.raises(KeyboardInterrupt), producer_span("s", source="x", run_id="r"):
        raise KeyboardInterrupt
    span = only(spans, "send s")
    assert span.status.status_code is StatusCode.UNSET
    assert span.end_time is not None


# -- setup and export ------------------------------------------------------------------------
def test_no_env_means_no_exporter_but_real_trace_ids(
    added_processors: list[SpanProcessor],
) -> None:
    setup_tracing()
    with tracer().start_as_current_span("tick") as span:
        assert span.is_recording()  # a real SDK span, not the API's no-op one
        trace_id = trace_id_hex()
    assert added_processors == []
    assert not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert span.get_span_context().trace_flags.sampled
    assert trace_id is not None
    assert HEX32.match(trace_id)
    assert trace_id != "0" * 32
    assert isinstance(span, ReadableSpan)
    assert span.resource.attributes["service.name"] == "coleta"
    assert span.resource.attributes["service.version"] == "0.1.0"


def test_tracer_before_setup_gives_real_ids(added_processors: list[SpanProcessor]) -> None:
    with producer_span("s", source="x", run_id="r"):
        assert trace_id_hex() is not None
    assert added_processors == []


def test_exporter_none_wins_over_endpoint(
    monkeypatch: pytest.MonkeyPatch, added_processors: list[SpanProcessor]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    setup_tracing()
    assert added_processors == []


def test_unknown_protocol_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match=r"'http/json'.*grpc.*http/protobuf"):
        setup_tracing()


def test_resource_and_sampler_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.version=9.9,deployment.environment=t")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    setup_tracing(service_name="coleta-test", version="1.2.3")
    with tracer().start_as_current_span("dropped") as span:
        trace_id = trace_id_hex()
    assert not span.is_recording()
    assert not span.get_span_context().trace_flags.sampled
    assert trace_id is not None  # still stored with the run, even when not sampled

    shutdown_tracing()
    monkeypatch.delenv("OTEL_TRACES_SAMPLER")
    setup_tracing(service_name="coleta-test", version="1.2.3")
    with tracer().start_as_current_span("kept") as kept:
        assert kept.is_recording()
    assert isinstance(kept, ReadableSpan)
    attributes = kept.resource.attributes
    assert attributes["service.name"] == "coleta-test"
    assert attributes["service.version"] == "9.9"  # the environment wins over the argument
    assert attributes["deployment.environment"] == "t"


def test_setup_is_idempotent_and_yields_to_use_provider(
    spans: InMemorySpanExporter, added_processors: list[SpanProcessor]
) -> None:
    setup_tracing()
    setup_tracing()
    with producer_span("s", source="x", run_id="r"):
        pass
    assert added_processors == []
    assert [span.name for span in spans.get_finished_spans()] == ["send s"]


def test_shutdown_is_safe_twice_and_without_setup() -> None:
    shutdown_tracing()
    setup_tracing()
    shutdown_tracing()
    shutdown_tracing()
    with producer_span("late", source="x", run_id="r"):
        assert trace_id_hex() is not None


def _send_a_run() -> tuple[str, str]:
    """Publish and consume one message; returns the trace id and the consumer span id."""
    with producer_span("coleta.cmd.rates", source="rates", run_id="r1") as sent:
        headers = inject()
    with consumer_span("coleta.cmd.rates", headers, consumer="fetcher") as handled:
        pass
    trace_id = trace_id_hex(sent)
    assert trace_id is not None
    return trace_id, f"{handled.get_span_context().span_id:016x}"


def test_spans_reach_an_otlp_http_receiver(
    monkeypatch: pytest.MonkeyPatch,
    otlp_http_receiver: tuple[str, Received],
    added_processors: list[SpanProcessor],
) -> None:
    endpoint, received = otlp_http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "x")
    setup_tracing()
    trace_id, consumer_span_id = _send_a_run()
    shutdown_tracing()  # the batch processor would otherwise wait up to 5 s

    assert [type(p) for p in added_processors] == [BatchSpanProcessor]
    assert received.paths == ["/v1/traces"]
    assert received.content_types == ["application/x-protobuf"]
    assert received.resource()["service.name"] == "x"
    assert received.resource()["service.version"] == "0.1.0"
    spans = received.spans_by_name()
    assert set(spans) == {"send coleta.cmd.rates", "process coleta.cmd.rates"}
    producer, consumer = spans["send coleta.cmd.rates"], spans["process coleta.cmd.rates"]
    assert producer.trace_id.hex() == consumer.trace_id.hex() == trace_id
    assert consumer.parent_span_id == producer.span_id
    assert consumer.span_id.hex() == consumer_span_id


def test_spans_reach_an_otlp_grpc_receiver_by_default(
    monkeypatch: pytest.MonkeyPatch, otlp_grpc_receiver: tuple[str, Received]
) -> None:
    endpoint, received = otlp_grpc_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    setup_tracing(service_name="coleta-grpc")
    trace_id, _ = _send_a_run()
    shutdown_tracing()

    assert received.resource()["service.name"] == "coleta-grpc"
    assert {span.trace_id.hex() for span in received.spans_by_name().values()} == {trace_id}


def _run_python(code: str, env: dict[str, str]) -> float:
    """Run ``code`` in a fresh interpreter (exit hooks included); returns its duration."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        timeout=60,
        capture_output=True,
    )
    return time.monotonic() - started


def test_spans_are_flushed_at_exit_without_shutdown(
    otlp_http_receiver: tuple[str, Received],
) -> None:
    endpoint, received = otlp_http_receiver
    code = (
        "from daemon.platform import spans as s, tracing as t\n"
        "t.setup_tracing()\n"
        "with s.producer_span('coleta.cmd.rates', source='rates', run_id='r1'): pass\n"
    )
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    _run_python(code, env)
    assert set(received.spans_by_name()) == {"send coleta.cmd.rates"}


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_an_unresponsive_collector_cannot_hold_up_shutdown(protocol: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        code = (
            "import time\n"
            "from daemon.platform import spans as s, tracing as t\n"
            "t.setup_tracing()\n"
            "with s.producer_span('s', source='x', run_id='r'): pass\n"
            "started = time.monotonic()\n"
            "t.shutdown_tracing(timeout_s=0.5)\n"
            "assert time.monotonic() - started < 1.5, time.monotonic() - started\n"
        )
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "20",
        }
        # The exporter alone would wait 20 s for an answer, and the SDK's exit hook again.
        assert _run_python(code, env) < 10
