"""The Prometheus endpoint: coleta's metrics on ``/metrics``, for a Prometheus to scrape.

Asked for as the OpenTelemetry SDK's own auto-configuration asks for it:
``OTEL_METRICS_EXPORTER=prometheus`` (alone, or in a list such as ``otlp,prometheus``), on
``OTEL_EXPORTER_PROMETHEUS_HOST`` (default ``localhost``) and ``OTEL_EXPORTER_PROMETHEUS_PORT``
(default 9464), the defaults of the OpenTelemetry specification. ``meter`` owns the endpoint
with its provider: it opens one here and closes it on shutdown.

The SDK's ``PrometheusMetricReader`` names what it serves by the OpenTelemetry-to-Prometheus
rules: dots become underscores, the unit is appended (``s`` → ``_seconds``, ``By`` →
``_bytes``; ``{run}``-style annotations add nothing), and counters end in ``_total``, so
``coleta.runs`` is ``coleta_runs_total`` and ``http.client.request.duration`` is
``http_client_request_duration_seconds``. Each endpoint has a registry of its own, with the
process, platform and garbage-collector collectors a Python exporter usually serves, so a
second provider in one process (tests) never collides with the first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_PROMETHEUS_HOST,
    OTEL_EXPORTER_PROMETHEUS_PORT,
)

from daemon.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.exporter.prometheus import PrometheusMetricReader

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Endpoint", "address_from_env", "open_endpoint"]

#: The OpenTelemetry specification's defaults for the Prometheus exporter.
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 9464
#: Longest wait for the server's thread once it was asked to stop (it polls every 0.5 s).
_STOP_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Endpoint:
    """A reader for the provider and the HTTP server that serves what it reads."""

    reader: PrometheusMetricReader
    host: str
    port: int  # the bound port: the one asked for, or the one the kernel chose for 0
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port; safe twice. The reader is the provider's to shut."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(_STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self._server.server_close()


def address_from_env() -> tuple[str, int]:
    """``OTEL_EXPORTER_PROMETHEUS_HOST`` and ``_PORT``, defaults filled, the port checked."""
    host = os.environ.get(OTEL_EXPORTER_PROMETHEUS_HOST, "").strip() or DEFAULT_HOST
    raw = os.environ.get(OTEL_EXPORTER_PROMETHEUS_PORT, "").strip()
    if not raw:
        return host, DEFAULT_PORT
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"{OTEL_EXPORTER_PROMETHEUS_PORT}: {raw!r} is not a port number (0-65535)"
        )
    return host, port


def open_endpoint() -> Endpoint:
    """Bind the address the environment names and serve ``/metrics`` from a thread.

    An address that cannot be bound (taken, not on this machine, not resolvable) is a
    ``ConfigError`` naming the variable and the address: the daemon exits 2 at start-up.
    """
    # Imported here: the exporter and prometheus_client cost every daemon process (each
    # worker too) about 0.15 s to import, and most never serve /metrics.
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
        start_http_server,
    )

    host, port = address_from_env()
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise _bind_error(host, port, exc) from exc
    thread.name = "prometheus-metrics"
    reader = PrometheusMetricReader(registry=registry)
    return Endpoint(reader, host, int(server.server_address[1]), server, thread)


def _bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"{OTEL_EXPORTER_PROMETHEUS_PORT}: port {port} on {host} is already in use, "
            f"cannot serve metrics there; choose another port"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"{OTEL_EXPORTER_PROMETHEUS_PORT}: not allowed to listen on port {port} "
            f"of {host} ({reason})"
        )
    return ConfigError(
        f"{OTEL_EXPORTER_PROMETHEUS_HOST}: cannot serve metrics on {host}:{port} ({reason})"
    )
