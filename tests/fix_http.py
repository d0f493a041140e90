"""Local HTTP APIs for the tests: a real server on 127.0.0.1, scripted per path.

``api.route("/rates", json={"EUR": 1})`` serves JSON; ``api.route("/x", status=503, times=2)``
fails twice before falling through to the next route for that path; every request is recorded
(method, path, query, headers, body) so a test can assert what coleta sent.
"""

from __future__ import annotations

import json as jsonlib
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: Serve this route this many times, then fall through to the next one (None: forever).
    times: int | None = None
    #: Answer only once this is set (a run the test holds until it lets it go).
    gate: threading.Event | None = None


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (a timeout, a cancelled run) is what tests provoke:
    not worth a traceback on the test run's stderr. Anything else still prints one."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class LocalAPI:
    """A scripted HTTP API on a free port of ``host`` (127.0.0.1; on Linux any 127.x.y.z is
    loopback, so ``LocalAPI("127.0.0.2")`` is another origin on the same machine)."""

    def __init__(self, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: a certificate and its key, to answer on https:// instead."""
        self.host = host
        self.scheme = "https" if tls else "http"
        self._routes: dict[str, list[Route]] = {}
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                seen = Seen(
                    self.command,
                    parts.path,
                    parse_qs(parts.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                route = api._take(parts.path, seen)
                if route.delay_s:
                    time.sleep(route.delay_s)
                if route.gate is not None:
                    route.gate.wait(timeout=60)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(route.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

        self._server = _QuietServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _take(self, path: str, seen: Seen) -> Route:
        with self._lock:
            self.requests.append(seen)
            routes = self._routes.get(path)
            if not routes:
                return Route(
                    status=404, body=b"no such route", headers={"Content-Type": "text/plain"}
                )
            route = routes[0]
            if route.times is not None:
                route.times -= 1
                if route.times <= 0 and len(routes) > 1:
                    routes.pop(0)
            return route

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def route(
        self,
        path: str,
        *,
        status: int = 200,
        json: Any = None,
        body: bytes | str | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
        times: int | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        """Add a response for ``path`` (routes for one path are served in order)."""
        hdrs = dict(headers or {})
        if json is not None:
            payload = jsonlib.dumps(json).encode()
            hdrs.setdefault("Content-Type", content_type or "application/json")
        else:
            payload = body.encode() if isinstance(body, str) else (body or b"")
            if content_type:
                hdrs.setdefault("Content-Type", content_type)
        route = Route(
            status=status, body=payload, headers=hdrs, delay_s=delay_s, times=times, gate=gate
        )
        with self._lock:
            self._routes.setdefault(path, []).append(route)

    def hits(self, path: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.requests if seen.path == path]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def api() -> Iterator[LocalAPI]:
    """A fresh local HTTP API for one test."""
    server = LocalAPI()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def other_api() -> Iterator[LocalAPI]:
    """A second local API on another host (127.0.0.2): another origin, and another host for
    what coleta keeps per host (pacing, a ``Retry-After`` hold)."""
    server = LocalAPI("127.0.0.2")
    server.start()
    try:
        yield server
    finally:
        server.stop()
