"""The aiohttp transport under the shared httpx client, against real servers on 127.0.0.1.

``RawServer`` answers with scripted bytes and records each request head exactly as it arrived
and each TCP connection it accepted, which ``LocalAPI`` (parsed, per request) cannot show.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import re
import socket
import socketserver
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import brotli
import httpx
import pytest

from daemon import __version__
from daemon.errors import FetchPermanent, FetchTransient
from daemon.fetcher._client import open_client
from daemon.fetcher._send import Fetched, send
from daemon.fetcher._transport import AiohttpTransport, _translate, tls_context
from tests._natsauth import make_pki
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Reply:
    """What the raw server does for one request: write ``data``, then stall and/or hang up."""

    data: bytes
    stall_s: float = 0.0
    close: bool = False


def http_response(
    status: int = 200,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    reason: str = "OK",
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawServer:
    """An HTTP/1.1 server that serves ``replies`` in order (the last one repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self._replies = list(replies)
        self._lock = threading.Lock()
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        raw = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with raw._lock:
                    raw.connections += 1
                with contextlib.suppress(OSError):  # the client hung up: so be it
                    while self.serve_one():
                        pass

            def serve_one(self) -> bool:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline(1 << 20)
                    if not line:
                        return False
                    head += line
                length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
                body = self.rfile.read(int(length[1])) if length else b""
                if re.search(rb"(?im)^transfer-encoding:[ \t]*chunked", head):
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()  # the empty line after the last chunk
                reply = raw._take(head, body)
                self.wfile.write(reply.data)
                time.sleep(reply.stall_s)
                return not reply.close

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _take(self, head: bytes, body: bytes) -> Reply:
        with self._lock:
            self.heads.append(head)
            self.bodies.append(body)
            return self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]

    def url(self, target: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{target}"

    def header_lines(self, index: int = -1) -> list[bytes]:
        return self.heads[index].split(b"\r\n")[1:-2]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    """``raw(Reply(...), ...)`` → a started RawServer, stopped after the test."""
    servers: list[RawServer] = []

    def start(*replies: Reply) -> RawServer:
        servers.append(RawServer(*replies))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with open_client() as shared:
        yield shared


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def fetch(
    client: httpx.AsyncClient, url: str, *, max_bytes: int = 1_000_000, timeout_s: float = 5.0
) -> Fetched:
    request = client.build_request("GET", url, timeout=httpx.Timeout(timeout_s))
    return await send(client, request, source="t", max_bytes=max_bytes)


OK = Reply(http_response(body=b'{"ok": 1}', headers=[("Content-Type", "application/json")]))


# -- failures map into httpx's tree, then into coleta's codes


async def test_a_refused_connection_is_a_connect_error_not_a_timeout(
    client: httpx.AsyncClient,
) -> None:
    with pytest.raises(FetchTransient) as exc_info:
        await fetch(client, f"http://127.0.0.1:{free_port()}/")
    assert exc_info.value.code == "connect"
    assert type(exc_info.value.__cause__) is httpx.ConnectError


async def test_an_unanswered_connect_is_a_connect_timeout(client: httpx.AsyncClient) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect never completes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            request = client.build_request(
                "GET",
                f"http://127.0.0.1:{port}/?api_key=SECRET",
                timeout=httpx.Timeout(5.0, connect=0.3),
            )
            with pytest.raises(FetchTransient) as exc_info:
                await send(client, request, source="t", max_bytes=100)
        finally:
            for filler in fillers:
                filler.close()
    assert exc_info.value.code == "timeout"
    assert type(exc_info.value.__cause__) is httpx.ConnectTimeout
    assert "SECRET" not in str(exc_info.value.__cause__)


@pytest.mark.parametrize("where", ["head", "body"])
async def test_a_stalled_response_is_a_read_timeout(
    client: httpx.AsyncClient, raw: Callable[..., RawServer], where: str
) -> None:
    partial = http_response(body=b"0123456789")[:-5] if where == "body" else b""
    server = raw(Reply(partial, stall_s=1.5))
    started = time.monotonic()
    with pytest.raises(FetchTransient) as exc_info:
        await fetch(client, server.url(), timeout_s=0.3)
    assert exc_info.value.code == "timeout"
    assert type(exc_info.value.__cause__) is httpx.ReadTimeout
    assert time.monotonic() - started < 1.2


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(b"", close=True), id="hang-up-without-reply"),
        pytest.param(Reply(b"NOT HTTP AT ALL\r\n\r\n", close=True), id="garbage-status-line"),
        pytest.param(Reply(http_response(body=b"0123456789")[:-4], close=True), id="short-body"),
        pytest.param(
            Reply(http_response(headers=[("X-Huge", "h" * 200_000)]), close=True),
            id="head-over-the-limit",
        ),
    ],
)
async def test_a_broken_response_is_a_protocol_error(
    client: httpx.AsyncClient, raw: Callable[..., RawServer], reply: Reply
) -> None:
    server = raw(reply)
    with pytest.raises(FetchTransient) as exc_info:
        await fetch(client, server.url("/?api_key=SECRET"))
    assert exc_info.value.code == "connect"
    assert type(exc_info.value.__cause__) is httpx.RemoteProtocolError
    # aiohttp's own message for a bad head carries the whole URL, key included.
    assert "SECRET" not in str(exc_info.value)
    assert "SECRET" not in str(exc_info.value.__cause__)


async def test_waiting_too_long_for_a_free_connection_is_a_pool_timeout(
    raw: Callable[..., RawServer],
) -> None:
    server = raw(OK)
    async with open_client(max_connections=1) as client:
        held = await client.send(client.build_request("GET", server.url()), stream=True)
        request = client.build_request("GET", server.url(), timeout=httpx.Timeout(5, pool=0.2))
        with pytest.raises(FetchTransient) as exc_info:
            await send(client, request, source="t", max_bytes=100)
        await held.aclose()
        fetched = await fetch(client, server.url())  # the slot came back
    assert exc_info.value.code == "timeout"
    assert type(exc_info.value.__cause__) is httpx.PoolTimeout
    assert fetched.body == b'{"ok": 1}'


async def test_a_url_that_is_not_http_is_unsupported(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.UnsupportedProtocol, match="unsupported protocol 'ftp://'"):
        await client.get("ftp://127.0.0.1/file")


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientPayloadError("short"), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
        (aiohttp.NonHttpUrlClientError("ftp://x"), httpx.UnsupportedProtocol),
        (ValueError("newline in a header"), httpx.LocalProtocolError),
    ],
)
def test_each_aiohttp_failure_has_its_httpx_class(
    raised: Exception, expected: type[httpx.TransportError]
) -> None:
    assert type(_translate(raised)) is expected


# -- what goes out is what httpx built


async def test_the_target_reaches_the_server_byte_for_byte(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    server = raw(OK)
    await fetch(client, server.url("/a%2Fb/c?path=x%2Fy&plus=1+2&space=a%20b&city=São Paulo"))
    request_line = server.heads[0].split(b"\r\n")[0]
    assert request_line == (
        b"GET /a%2Fb/c?path=x%2Fy&plus=1+2&space=a%20b&city=S%C3%A3o%20Paulo HTTP/1.1"
    )


async def test_headers_go_out_as_httpx_built_them(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    server = raw(OK)
    request = client.build_request(
        "POST",
        server.url("/in"),
        content=b"\x00raw body\xff",
        headers=[("X-Twice", "1"), ("X-Twice", "2")],
    )
    del request.headers["Accept-Encoding"]  # aiohttp must not put its own back
    await send(client, request, source="t", max_bytes=100)
    lines = server.header_lines()
    names = [line.split(b":")[0].lower() for line in lines]
    assert b"user-agent: coleta/" + __version__.encode() in [line.lower() for line in lines]
    assert names.count(b"user-agent") == 1
    assert b"accept-encoding" not in names
    assert b"content-type" not in names  # httpx sets none for raw bytes
    assert [line for line in lines if line.lower().startswith(b"x-twice")] == [
        b"X-Twice: 1",
        b"X-Twice: 2",
    ]
    assert server.bodies == [b"\x00raw body\xff"]


async def test_a_streamed_request_body_goes_out_chunked(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    server = raw(OK)

    async def parts() -> AsyncIterator[bytes]:
        yield b"first,"
        yield b"second"

    request = client.build_request("POST", server.url("/upload"), content=parts())
    await send(client, request, source="t", max_bytes=100)
    names = [line.split(b":")[0].lower() for line in server.header_lines()]
    assert server.bodies == [b"first,second"]
    assert names.count(b"transfer-encoding") == 1
    assert b"content-length" not in names


async def test_credentials_in_the_url_become_one_authorization_header(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    server = raw(OK)
    fetched = await fetch(client, f"http://user:p%40ss@127.0.0.1:{server.port}/private")
    expected = b"Authorization: Basic " + base64.b64encode(b"user:p@ss")
    assert fetched.status_code == 200
    assert [line for line in server.header_lines() if b"uthorization" in line] == [expected]


async def test_no_cookie_travels_from_a_response_to_the_next_request(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    server = raw(Reply(http_response(headers=[("Set-Cookie", "session=abc; Path=/")])))
    site = f"http://localhost:{server.port}"  # a host name: cookie jars may ignore IPs
    await fetch(client, f"{site}/login")
    await fetch(client, f"{site}/again")
    assert not client.cookies
    cookies = [[line for line in server.header_lines(i) if b"ookie" in line] for i in (0, 1)]
    assert cookies == [[], []]


async def test_proxies_from_the_environment_are_used(
    api: LocalAPI, raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    api.route("/via-proxy", json={"proxied": True})
    for name in ("ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", api.url())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # direct, through our transport
    server = raw(OK)
    async with open_client() as client:
        proxied = await fetch(client, "http://upstream.invalid/via-proxy")
        direct = await fetch(client, server.url("/direct"))
    (hit,) = api.hits("/via-proxy")
    assert hit.headers["host"] == "upstream.invalid"
    assert proxied.body == b'{"proxied": true}'
    assert direct.body == b'{"ok": 1}'


# -- what comes back is what the server sent


@pytest.mark.parametrize(
    ("encoding", "pack"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress)],
)
async def test_compressed_bodies_are_decoded_once(
    client: httpx.AsyncClient,
    api: LocalAPI,
    encoding: str,
    pack: Callable[[bytes], bytes],
) -> None:
    plain = b'{"text": "' + b"compressible " * 500 + b'"}'
    api.route("/packed", body=pack(plain), headers={"Content-Encoding": encoding})
    fetched = await fetch(client, api.url("/packed"))
    assert fetched.body == plain
    (hit,) = api.hits("/packed")
    assert hit.headers["accept-encoding"] == "gzip, deflate, br"


async def test_status_reason_and_duplicate_headers_pass_through(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    headers = [("X-Dup", "a"), ("Set-Cookie", "a=1"), ("X-Dup", "b"), ("Set-Cookie", "b=2")]
    server = raw(Reply(http_response(299, b"body", headers, reason="Quite Fine")))
    response = await client.get(server.url())
    assert (response.status_code, response.reason_phrase) == (299, "Quite Fine")
    assert response.http_version == "HTTP/1.1"
    assert response.headers.get_list("x-dup") == ["a", "b"]
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.content == b"body"


async def test_a_20_kb_response_header_is_accepted(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    big = "t" * 20_000
    server = raw(Reply(http_response(body=b"{}", headers=[("X-Padding", big)])))
    fetched = await fetch(client, server.url())
    assert fetched.headers["x-padding"] == big


# -- the connection pool


async def test_connections_are_kept_alive(
    client: httpx.AsyncClient, raw: Callable[..., RawServer]
) -> None:
    server = raw(OK)
    for page in range(5):
        fetched = await fetch(client, server.url(f"/page/{page}"))
        assert fetched.body == b'{"ok": 1}'
    assert (len(server.heads), server.connections) == (5, 1)


async def test_an_oversized_response_is_cut_off_and_the_client_carries_on(
    raw: Callable[..., RawServer],
) -> None:
    server = raw(Reply(http_response(body=b"x" * 2_000_000)), OK)
    async with open_client(max_connections=1) as client:  # a leaked slot would block
        with pytest.raises(FetchPermanent) as exc_info:
            await fetch(client, server.url("/huge"), max_bytes=1000)
        fetched = await fetch(client, server.url("/next"), timeout_s=2.0)
        again = await fetch(client, server.url("/again"), timeout_s=2.0)
    assert exc_info.value.code == "response_too_large"
    assert fetched.body == again.body == b'{"ok": 1}'
    # The half-read connection was dropped, not reused; the clean one was.
    assert server.connections == 2


async def test_the_transport_closes_its_session_with_the_client(
    raw: Callable[..., RawServer],
) -> None:
    server = raw(OK)
    transport = AiohttpTransport()
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(server.url())).status_code == 200
        session = transport._session
        assert session is not None
        assert not session.closed
    assert session.closed


async def test_https_trusts_the_ca_that_ssl_cert_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API behind a private CA is refused, then trusted once SSL_CERT_FILE names the CA
    (as httpx reads it): clients share one TLS context per setting, never a stale one."""
    pki = make_pki(tmp_path)
    api = LocalAPI(tls=(pki.server_cert, pki.server_key))
    api.route("/rates", json={"eur": 1})
    api.start()
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        async with open_client() as client:
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                await client.get(api.url("/rates"))
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        for _ in range(2):  # the second client reuses the first one's context
            async with open_client() as client:
                response = await client.get(api.url("/rates"))
            assert response.json() == {"eur": 1}
        assert tls_context() is tls_context()
    finally:
        api.stop()
