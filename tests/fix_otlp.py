"""Telemetry for the tests: in-memory spans and metrics, and local OTLP receivers.

``spans`` installs a tracer provider whose finished spans an in-memory exporter keeps, and
``metrics_reader`` an in-memory metric reader; each puts the process's telemetry back after
the test. ``otlp_http_receiver`` and ``otlp_grpc_receiver`` are real HTTP and gRPC servers on
throwaway ports, each giving ``(endpoint, received)``: point an
``OTEL_EXPORTER_OTLP_*ENDPOINT`` at the endpoint and read the decoded trace and metric export
requests from ``received``. ``no_otel_env`` removes every ``OTEL_*`` variable for one test.
"""

from __future__ import annotations

import gzip
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daemon.platform import meter, tracing


@dataclass
class Received:
    """What a local OTLP receiver got: decoded requests and, over HTTP, request metadata."""

    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)

    def spans(self) -> list[tuple[dict[str, str], Any]]:
        """``(resource attributes, span)`` of every span received."""
        return [
            (_strings(resource_spans.resource.attributes), span)
            for request in self.traces
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def spans_by_name(self) -> dict[str, Any]:
        """Every span received, by name (the last one of a name wins)."""
        return {span.name: span for _, span in self.spans()}

    def resource(self) -> dict[str, str]:
        """The resource attributes of the one trace export request received."""
        (request,) = self.traces
        (resource_spans,) = request.resource_spans
        return _strings(resource_spans.resource.attributes)

    def points(self, name: str) -> list[tuple[dict[str, str], dict[str, Any], Any]]:
        """``(resource attributes, point attributes, point)`` of metric ``name``, every export."""
        found = []
        for request in self.metrics:
            for resource_metrics in request.resource_metrics:
                resource = _strings(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name != name:
                            continue
                        data = getattr(metric, metric.WhichOneof("data"))
                        for point in data.data_points:
                            found.append((resource, _values(point.attributes), point))
        return found


def _strings(attributes: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in attributes}


def _values(attributes: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in attributes}


def spans_of_run(exporter: InMemorySpanExporter, run_id: str) -> list[ReadableSpan]:
    """The finished spans that carry ``coleta.run_id = run_id``."""
    return [
        span
        for span in exporter.get_finished_spans()
        if (span.attributes or {}).get("coleta.run_id") == run_id
    ]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span the code under test finishes, kept in memory (no export)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing._reset_for_tests()


@pytest.fixture
def metrics_reader() -> Iterator[InMemoryMetricReader]:
    """What the code under test records, read in memory (no export)."""
    meter._reset_for_tests()
    reader = InMemoryMetricReader()
    meter.use_reader(reader)
    yield reader
    meter._reset_for_tests()


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``OTEL_*`` configuration from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def otlp_http_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver for traces and metrics on a throwaway port."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path.endswith("/v1/traces"):
                traces = trace_service_pb2.ExportTraceServiceRequest()
                traces.ParseFromString(body)
                received.traces.append(traces)
            else:
                metrics = metrics_service_pb2.ExportMetricsServiceRequest()
                metrics.ParseFromString(body)
                received.metrics.append(metrics)
            received.paths.append(self.path)
            received.content_types.append(self.headers.get("Content-Type", ""))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output clean."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="otlp-http-receiver")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def otlp_grpc_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/gRPC receiver for traces and metrics on a throwaway port."""
    received = Received()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(
            self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            received.traces.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(
            self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
        ) -> metrics_service_pb2.ExportMetricsServiceResponse:
            received.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # The generated gRPC modules carry no annotations.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None).wait(5)
