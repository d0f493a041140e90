"""A fast local HTTP/1.1 API for the benchmarks: precomputed JSON pages, keep-alive, raw asyncio.

Run as its own process (``python -m bench.mock_api``), so serving never competes with the
measured process for the GIL. It prints ``PORT <n>`` once it listens and serves until its
standard input closes (the benchmark exits) or it gets SIGTERM.

Routes (GET only; any header is ignored, any request body skipped):

``/pages?page=N&pages=T``
    Page ``N`` (1-based) of ``T`` (default 1000): ``{"page", "pages", "has_more", "items"}``
    with ``RECORDS_PER_PAGE`` records of about 200 bytes, about 20 KB in all. Page-number
    pagination: ``has_more`` is false on page ``T``.
``/big?mb=M``
    One JSON array of records of about ``M`` MB (built on first request, then cached).
``/error?mb=M``
    A ``500`` whose body is ``M`` MB of text: what a client must not read whole.
``/stats``
    ``{"requests": n, "cpu_s": process CPU seconds}``, to show what serving cost the mock.

Every response is built once and kept as bytes (status line, headers and body), so a repeat
costs one dictionary lookup and one ``transport.write``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from urllib.parse import parse_qs, urlsplit

__all__ = ["RECORDS_PER_PAGE", "big_body", "page_body", "serve"]

RECORDS_PER_PAGE = 100
DEFAULT_PAGES = 1000
_HEAD_END = b"\r\n\r\n"
_MAX_CACHED = 50_000


def _record(i: int) -> dict[str, object]:
    """One record of about 200 bytes of JSON."""
    return {
        "id": i,
        "sku": f"SKU-{i:09d}",
        "name": f"item {i} lorem ipsum dolor sit amet",
        "price": round((i % 100_000) / 7, 2),
        "qty": i % 97,
        "active": i % 3 != 0,
        "tags": ["alpha", "beta", "gamma"][: 1 + i % 3],
        "updated_at": f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
        "warehouse": {"code": f"W{i % 50:03d}", "zone": "north" if i % 2 else "south"},
    }


def page_body(page: int, pages: int = DEFAULT_PAGES) -> bytes:
    """The JSON body of page ``page`` of ``pages``; the same bytes every time."""
    first = (page - 1) * RECORDS_PER_PAGE
    items = [_record(first + k) for k in range(RECORDS_PER_PAGE)]
    doc = {"page": page, "pages": pages, "has_more": page < pages, "items": items}
    return json.dumps(doc, separators=(",", ":")).encode()


def big_body(mb: float) -> bytes:
    """A JSON array of records of about ``mb`` megabytes."""
    target = int(mb * 1_000_000)
    parts: list[bytes] = []
    size, i = 2, 0
    while size < target:
        part = json.dumps(_record(i), separators=(",", ":")).encode()
        parts.append(part)
        size += len(part) + 1
        i += 1
    return b"[" + b",".join(parts) + b"]"


def _response(body: bytes, status: str = "200 OK", ctype: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


_NOT_FOUND = _response(b"no such route", "404 Not Found", "text/plain")
_BAD_REQUEST = _response(b"bad request", "400 Bad Request", "text/plain")


class _Stats:
    requests = 0


class _Routes:
    """Target → full response bytes, built on first use."""

    def __init__(self) -> None:
        self._cache: dict[bytes, bytes] = {}

    def respond(self, target: bytes) -> bytes:
        cached = self._cache.get(target)
        if cached is not None:
            return cached
        parts = urlsplit(target.decode("latin-1"))
        query = parse_qs(parts.query)
        # The same page asked for with its parameters in another order: one built response.
        canonical = (parts.path + "?" + "&".join(sorted(parts.query.split("&")))).encode()
        if (found := self._cache.get(canonical)) is not None:
            self._cache[target] = found
            return found
        try:
            if parts.path == "/pages":
                page = int(query.get("page", ["1"])[0])
                pages = int(query.get("pages", [str(DEFAULT_PAGES)])[0])
                if page < 1:
                    return _BAD_REQUEST
                response = _response(page_body(page, pages))
            elif parts.path == "/big":
                response = _response(big_body(float(query.get("mb", ["50"])[0])))
            elif parts.path == "/error":
                size = int(float(query.get("mb", ["300"])[0]) * 1_000_000)
                response = _response(b"E" * size, "500 Internal Server Error", "text/plain")
            elif parts.path == "/stats":
                stats = {"requests": _Stats.requests, "cpu_s": time.process_time()}
                return _response(json.dumps(stats).encode())
            else:
                return _NOT_FOUND
        except ValueError:
            return _BAD_REQUEST
        if len(self._cache) < _MAX_CACHED:
            self._cache[target] = self._cache[canonical] = response
        return response

    def warm(self, sizes: list[int]) -> None:
        """Build the ``/pages`` responses of runs of these sizes now, outside measurements."""
        for pages in sizes:
            for page in range(1, pages + 1):
                self.respond(f"/pages?page={page}&pages={pages}".encode())


class _Connection(asyncio.Protocol):
    def __init__(self, routes: _Routes) -> None:
        self._routes = routes
        self._buffer = b""
        self._skip = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if self._skip:
            dropped = min(self._skip, len(buffer))
            buffer, self._skip = buffer[dropped:], self._skip - dropped
        while (end := buffer.find(_HEAD_END)) >= 0:
            head, buffer = buffer[:end], buffer[end + 4 :]
            line, _, headers = head.partition(b"\r\n")
            fields = line.split(b" ")
            if len(fields) != 3:
                self._reply(_BAD_REQUEST)
                continue
            length = _content_length(headers)
            if length:
                dropped = min(length, len(buffer))
                buffer, self._skip = buffer[dropped:], length - dropped
            _Stats.requests += 1
            self._reply(self._routes.respond(fields[1]))
        self._buffer = buffer

    def _reply(self, response: bytes) -> None:
        assert self._transport is not None
        self._transport.write(response)


def _content_length(headers: bytes) -> int:
    lower = headers.lower()
    at = lower.find(b"content-length:")
    if at < 0:
        return 0
    value = lower[at + 15 :].split(b"\r\n", 1)[0].strip()
    return int(value) if value.isdigit() else 0


async def serve(host: str, port: int, *, warm: list[int] | None = None) -> None:
    """Serve until stdin closes or SIGTERM; print ``PORT <n>`` once listening."""
    routes = _Routes()
    routes.warm(warm or [])
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(routes), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with contextlib.suppress(NotImplementedError, ValueError):
        loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mock_api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--warm",
        default=f"1,100,{DEFAULT_PAGES}",
        help="comma-separated run sizes (pages) whose pages are built at start",
    )
    args = parser.parse_args()
    sizes = [int(x) for x in args.warm.split(",") if x.strip()]
    asyncio.run(serve(args.host, args.port, warm=sizes))


if __name__ == "__main__":
    main()
