"""A hostile HTTP API: every answer a misbehaving server can give, at random, on a real socket.

Written on raw asyncio streams (not http.server) so it can also break HTTP itself: reset a
connection mid-body, promise more bytes than it sends, answer with garbage. Every complete body
it serves carries a token (``"token": "<32 hex>"`` in JSON, ``TOKEN:<32 hex>`` in bytes) and is
recorded, so a test can check that each stored row is one whole served body, byte for byte or
JSON-equal — never a truncated or mangled one.

Runs in its own thread with its own event loop, so it answers while the test's loop is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest

from tests._rawserver import RawServer

#: What the API may answer, with weights: mostly hostile, enough good answers to store.
KINDS: dict[str, int] = {
    "ok_json": 8,
    "numbers": 3,
    "deep_1k": 2,
    "deep_20k": 2,
    "deep_100k": 1,
    "ndjson": 2,
    "binary": 2,
    "latin1": 2,
    "utf16_json": 1,
    "large_json": 1,
    "empty": 1,
    "bad_gzip": 2,
    "big_error": 2,
    "rate_limited": 2,
    "server_error": 2,
    "not_found": 1,
    "redirect_loop": 1,
    "bad_redirect": 1,
    "redirect_ok": 2,
    "reset": 2,
    "truncated": 2,
    "garbage": 1,
    "slow": 1,
    "huge_headers": 1,
}

TOKEN_RE = re.compile(rb"(?:\"token\": ?\"|TOKEN:)([0-9a-f]{32})")


@dataclass
class Served:
    """A complete body the API sent with a 2xx, by token."""

    kind: str
    content_type: str
    body: bytes


@dataclass
class HostileAPI:
    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 0
    served: dict[str, Served] = field(default_factory=dict)
    answered: Counter[str] = field(default_factory=Counter)
    #: Per path, how many pages a paginated source gets before its last page.
    pages: int = 3
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _raw: RawServer | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> None:
        self._rng = random.Random(self.seed)
        self._raw = RawServer(self._client, host=self.host, name="hostile-api")
        self._raw.start()
        self.port = self._raw.port

    def stop(self) -> None:
        """Close the server and every connection, and wait for the loop to end."""
        if self._raw is not None:
            self._raw.stop()

    def _pick(self) -> str:
        with self._lock:
            return self._rng.choices(list(KINDS), weights=list(KINDS.values()))[0]

    def _record(self, kind: str, content_type: str, body: bytes) -> None:
        match = TOKEN_RE.search(body)
        assert match is not None, f"{kind} body has no token"
        with self._lock:
            self.served[match[1].decode()] = Served(kind, content_type, body)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                if "transfer-encoding" in headers or int(headers.get("content-length", 0)):
                    # coleta's GETs carry no body: a body here is a client bug.
                    await self._send(writer, 400, b"unexpected request body", "text/plain")
                    return
                keep = await self._answer(writer, method, target)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, method: str, target: str) -> bool:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        page = int(query.get("page", ["1"])[0] or 1)
        kind = "redirect_target" if parts.path.endswith("/landing") else self._pick()
        with self._lock:
            self.answered[kind] += 1
        token = secrets.token_hex(16)
        paginated = parts.path.startswith("/paged")
        more = paginated and page < self.pages

        def doc(**extra: object) -> bytes:
            value: dict[str, object] = {"token": token, "page": page, **extra}
            if paginated:
                value["items"] = (
                    [{"i": i, "page": page} for i in range(3)] if more or page == self.pages else []
                )
                value["has_more"] = more
            return json.dumps(value).encode()

        if kind in ("ok_json", "redirect_target"):
            return await self._ok(writer, kind, "application/json", doc(kind=kind))
        if kind == "numbers":
            body = (
                doc()[:-1]
                + b', "n": 12345678901234567.89, "big": 1e400, "i": 1180591620717411303424}'
            )
            return await self._ok(writer, kind, "application/json", body)
        if kind.startswith("deep_"):
            depth = {"deep_1k": 1000, "deep_20k": 20_000, "deep_100k": 100_000}[kind]
            body = doc()[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
            return await self._ok(writer, kind, "application/json", body)
        if kind == "ndjson":
            lines = [json.dumps({"token": token, "line": i}).encode() for i in range(3)]
            return await self._ok(writer, kind, "application/x-ndjson", b"\n".join(lines))
        if kind == "binary":
            body = b"TOKEN:" + token.encode() + bytes(range(256)) * 4 + b"\x00\xff"
            return await self._ok(writer, kind, "application/octet-stream", body)
        if kind == "latin1":
            body = b"TOKEN:" + token.encode() + " caf\xe9 na\xefve".encode("latin-1")
            return await self._ok(writer, kind, "text/plain; charset=latin-1", body)
        if kind == "utf16_json":
            body = json.dumps({"token": token, "text": "olá"}).encode("utf-16")
            # Recorded by its UTF-16 bytes; the token is found after decoding.
            with self._lock:
                self.served[token] = Served(kind, "application/json; charset=utf-16", body)
            await self._send(writer, 200, body, "application/json; charset=utf-16")
            return True
        if kind == "large_json":
            body = doc(blob="x" * 1_500_000)
            return await self._ok(writer, kind, "application/json", body)
        if kind == "empty":
            await self._send(writer, 200, b"", "application/json")
            return True
        if kind == "bad_gzip":
            await self._send(
                writer,
                200,
                b"not gzip at all",
                "application/json",
                extra={"Content-Encoding": "gzip"},
            )
            return True
        if kind == "big_error":
            await self._send(writer, 500, b"E" * 5_000_000, "text/plain")
            return True
        if kind == "rate_limited":
            await self._send(writer, 429, b"slow down", "text/plain", extra={"Retry-After": "1"})
            return True
        if kind == "server_error":
            await self._send(writer, 503, b"try later", "text/plain")
            return True
        if kind == "not_found":
            await self._send(writer, 404, b"no such thing", "text/plain")
            return True
        if kind == "redirect_loop":
            await self._send(writer, 302, b"", "text/plain", extra={"Location": parts.path})
            return True
        if kind == "bad_redirect":
            await self._send(writer, 302, b"", "text/plain", extra={"Location": "http://[::1"})
            return True
        if kind == "redirect_ok":
            location = (
                parts.path.rstrip("/") + "/landing" + (f"?{parts.query}" if parts.query else "")
            )
            await self._send(writer, 302, b"", "text/plain", extra={"Location": location})
            return True
        if kind == "reset":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"tok'
            )
            await writer.drain()
            transport = writer.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                import socket
                import struct

                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return False
        if kind == "truncated":
            body = doc()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body) + 500}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return False
        if kind == "garbage":
            writer.write(b"\x00\x01 this is not HTTP \xff\r\n\r\n")
            await writer.drain()
            return False
        if kind == "slow":
            await asyncio.sleep(5)
            return await self._ok(writer, kind, "application/json", doc(kind=kind))
        if kind == "huge_headers":
            extra = {f"X-Noise-{i}": "n" * 200 for i in range(300)}
            await self._send(writer, 200, doc(kind=kind), "application/json", extra=extra)
            self._record(kind, "application/json", doc(kind=kind))
            return True
        raise AssertionError(kind)

    async def _ok(self, writer: asyncio.StreamWriter, kind: str, ctype: str, body: bytes) -> bool:
        self._record(kind, ctype, body)
        await self._send(writer, 200, body, ctype)
        return True

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        *,
        extra: dict[str, str] | None = None,
    ) -> None:
        reason = {
            200: "OK",
            302: "Found",
            400: "Bad Request",
            404: "Not Found",
            429: "Too Many Requests",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(status, "Status")
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


@pytest.fixture
def hostile_api() -> Iterator[HostileAPI]:
    api = HostileAPI(seed=int.from_bytes(secrets.token_bytes(4), "big"))
    api.start()
    try:
        yield api
    finally:
        api.stop()
