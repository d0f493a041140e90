"""What a hostile API or a bad URL can throw at the HTTP client, end to end through ``send``.

Every failure leaves ``send`` / ``build_request`` / ``next_request`` as a ``FetchTransient`` or
``FetchPermanent`` with a stable code (never as a raw httpx, aiohttp or Unicode exception, which
the fetcher can only hand back every 5 s forever); no body coleta does not store is read past a
few KiB; no request without a body sends one.

``Wire`` is a raw HTTP/1.1 server on asyncio streams: it sees the exact bytes of each request,
like a server that never reads the body of a GET (so a stray chunked ``0`` would become the next
request on a kept-alive connection), and its answers are coroutines that may write forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import re
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import brotli
import httpx
import psycopg
import pytest

from daemon.app import open_daemon
from daemon.errors import FetchPermanent, FetchTransient
from daemon.fetcher._auth import Credentials
from daemon.fetcher._client import open_client
from daemon.fetcher._request import build_request, next_request
from daemon.fetcher._send import send
from daemon.settings import OAuth2Auth, SourceConfig
from tests._collect import run, window
from tests._collect import source as collect_source
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.1$")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Exchange:
    """One request as it arrived: its head byte for byte, and the body the server read."""

    method: str
    target: str
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        match = re.search(rb"(?im)^" + name.encode() + rb":[ \t]*([^\r\n]*)", self.head)
        return match[1].decode("latin-1") if match else None


#: What the server does for a request: write to the stream; return False to hang up after.
Answer = Callable[[Exchange, asyncio.StreamWriter], Awaitable[bool]]


def reply(
    status: int = 200,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
    reason: str = "Whatever",
) -> Answer:
    """An answer that writes one complete response and keeps the connection."""
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    data = ("\r\n".join([*lines, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode("latin-1")

    async def write(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(data + body)
        await writer.drain()
        return True

    return write


@dataclass
class Wire:
    """A raw HTTP/1.1 server on 127.0.0.1: ``routes`` maps a path to its answer."""

    routes: dict[str, Answer] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    #: What broke HTTP/1.1 on the way in: a GET with a body, bytes that are no request line.
    violations: list[str] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    def url(self, target: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{target}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await self._one(reader, writer):
                pass
        writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        line = _REQUEST_LINE.match(head.split(b"\r\n", 1)[0])
        if line is None:
            self.violations.append(f"not a request line: {head[:40]!r}")
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return False
        method, target = line[1].decode(), line[2].decode()
        exchange = Exchange(method, target, head, b"")
        length, chunked = exchange.header("content-length"), exchange.header("transfer-encoding")
        if method in ("GET", "HEAD"):
            # Like many servers: a GET has no body, so none is read (RFC 9110 §9.3.1).
            if chunked is not None or (length or "0") != "0":
                self.violations.append(f"{method} {target} carries a body: {head!r}")
        elif length is not None:
            exchange = Exchange(method, target, head, await reader.readexactly(int(length)))
        elif chunked is not None:
            body = b""
            while size := int((await reader.readline()).split(b";")[0], 16):
                body += await reader.readexactly(size)
                await reader.readline()
            await reader.readline()
            exchange = Exchange(method, target, head, body)
        self.exchanges.append(exchange)
        answer = self.routes.get(target.split("?")[0]) or reply(404, b"no such route")
        return await answer(exchange, writer)


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    server = Wire()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with open_client() as shared:
        yield shared


class Unchecked(SourceConfig, frozen=True):
    """A source whose URL passed the config check: that renders templates with a sample window,
    while each run renders its own, so ``build_request`` checks again."""

    def __post_init__(self) -> None:
        pass


def source_config(url: str, **overrides: Any) -> SourceConfig:
    return SourceConfig(name="rates", url=url, schedule="0 7 * * *", **overrides)


async def fetch(client: httpx.AsyncClient, url: str, *, max_bytes: int = 1_000_000) -> Any:
    request = client.build_request("GET", url, timeout=httpx.Timeout(5.0))
    return await send(client, request, source="rates", max_bytes=max_bytes)


# -- 1. every failure is classified, with a stable code


async def test_a_redirect_loop_is_permanent_too_many_redirects(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    wire.routes["/loop"] = reply(302, headers=(("Location", "/loop?again=1"),))
    with pytest.raises(FetchPermanent) as exc_info:
        await fetch(client, wire.url("/loop?api_key=SECRET"))
    assert exc_info.value.code == "too_many_redirects"
    assert exc_info.value.url == wire.url("/loop?api_key=REDACTED")
    assert len(wire.exchanges) == 21  # the first request and httpx's 20 redirects


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        pytest.param("http://[::1", "Invalid port", id="unclosed-ipv6-bracket"),
        pytest.param("http://127.0.0.1:99999/", "port 99999", id="port-out-of-range"),
        pytest.param("http://127.0.0.1:0/", "port 0", id="port-zero"),
        pytest.param("http://exa mple.com/", "host", id="space-in-host"),
        pytest.param("http://xn--zz.com/", "cannot be encoded", id="bad-idna-label"),
        pytest.param(
            "http://" + "a" * 64 + ".example/", "valid host name", id="dns-label-too-long"
        ),
        pytest.param("ftp://127.0.0.1/file", "'ftp'", id="not-http"),
    ],
)
async def test_a_redirect_to_an_invalid_url_is_permanent_bad_redirect(
    client: httpx.AsyncClient, wire: Wire, location: str, reason: str
) -> None:
    wire.routes["/moved"] = reply(302, headers=(("Location", location),))
    with pytest.raises(FetchPermanent) as exc_info:
        await fetch(client, wire.url("/moved?api_key=SECRET"))
    error = exc_info.value
    assert error.code == "bad_redirect"
    assert reason in str(error)
    assert str(error).startswith(f"{wire.url('/moved?api_key=REDACTED')} redirects to ")
    assert "SECRET" not in str(error)


async def test_a_redirect_target_carrying_the_key_is_redacted(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    wire.routes["/moved"] = reply(302, headers=(("Location", "http://h:99999/?api_key=SECRET"),))
    with pytest.raises(FetchPermanent) as exc_info:
        await fetch(client, wire.url("/moved"))
    assert exc_info.value.code == "bad_redirect"
    assert "SECRET" not in str(exc_info.value)


async def test_a_body_that_does_not_match_its_content_encoding_is_permanent(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    wire.routes["/packed"] = reply(200, b"plain, not gzip", (("Content-Encoding", "gzip"),))
    with pytest.raises(FetchPermanent) as exc_info:
        await fetch(client, wire.url("/packed"))
    assert (exc_info.value.code, exc_info.value.url) == ("bad_encoding", wire.url("/packed"))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("http://{source}:99999/x", "port 99999", id="templated-port"),
        pytest.param("http://{scheduled_for:%d %b}.example/", "host", id="space-in-host"),
        pytest.param("http://{scheduled_for}/x", "Invalid port", id="iso-date-as-host"),
    ],
)
async def test_a_url_invalid_after_templating_is_permanent_bad_url(
    client: httpx.AsyncClient, url: str, reason: str
) -> None:
    source = Unchecked(name="rates", url=url, schedule="0 7 * * *")
    with pytest.raises(FetchPermanent) as exc_info:
        build_request(client, source, window("Europe/Berlin"))
    assert exc_info.value.code == "bad_url"
    assert reason in str(exc_info.value)
    assert exc_info.value.source == "rates"


@pytest.mark.parametrize(
    "later",
    [
        "http://127.0.0.1:99999/next",
        "http://[::1/next",
        "http://exa mple.com/next",
        "http://127.0.0.1/\ud800",
    ],
)
async def test_a_next_page_url_coleta_cannot_request_is_permanent_bad_url(
    client: httpx.AsyncClient, later: str
) -> None:
    source = source_config("http://api.example/first")
    first = build_request(client, source, window("Europe/Berlin"))
    makers: list[Callable[[], httpx.Request]] = [
        lambda: next_request(first, later, source=source),
        lambda: build_request(client, source, window("Europe/Berlin"), url=later),
    ]
    for make in makers:
        with pytest.raises(FetchPermanent) as exc_info:
            make()
        assert exc_info.value.code == "bad_url"


async def test_a_validator_that_is_not_ascii_goes_back_as_it_came(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    # An ETag in UTF-8 (obs-text): httpx decodes it, then refuses to encode it again.
    etag = '"café-1"'.encode()
    wire.routes["/data"] = reply(200, b"{}", (("ETag", etag.decode("latin-1")),))
    source = source_config(wire.url("/data"))
    first = await send(
        client, build_request(client, source, window("Europe/Berlin")), source="rates", max_bytes=99
    )
    validators = {"If-None-Match": first.headers["etag"]}
    request = build_request(client, source, window("Europe/Berlin"), extra_headers=validators)
    await send(client, request, source="rates", max_bytes=99)
    assert wire.exchanges[-1].header("if-none-match") == etag.decode("latin-1")


# -- 2. a body coleta does not store is never read past a few KiB


class Endless:
    """An answer whose chunked body never ends (it stops at 64 MiB, so that a client that
    reads it all does end); ``pushed`` counts the body bytes the client's socket took."""

    def __init__(self, status: int, start: bytes, headers: tuple[tuple[str, str], ...] = ()):
        head = [f"HTTP/1.1 {status} Whatever", *(f"{k}: {v}" for k, v in headers)]
        self._head = ("\r\n".join([*head, "Transfer-Encoding: chunked"]) + "\r\n\r\n").encode()
        self._start = start
        self.pushed = 0

    async def __call__(self, exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(self._head)
        chunk = self._start.ljust(64 * 1024, b" ")
        while self.pushed < 64 * MIB:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()  # raises once the client hangs up
            self.pushed += len(chunk)
            chunk = b"x" * len(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


async def test_an_endless_error_body_is_cut_short_and_the_status_reported(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    wire.routes["/boom"] = boom = Endless(500, b'{"error": "overloaded"}')
    started = time.monotonic()
    with pytest.raises(FetchTransient) as exc_info:
        await fetch(client, wire.url("/boom"))
    error = exc_info.value
    assert (error.code, error.status) == ("http_status", 500)
    assert str(error).startswith(f'HTTP 500 Whatever from {wire.url("/boom")}: {{"error": "ov')
    assert len(str(error)) < 300
    assert time.monotonic() - started < 2.0
    # What the sockets' buffers took (4 MiB here; Linux lets them grow to 6 + 4 MiB), no more.
    assert boom.pushed < 16 * MIB


async def test_an_endless_redirect_body_is_not_read(client: httpx.AsyncClient, wire: Wire) -> None:
    wire.routes["/moved"] = moved = Endless(302, b"see /here", (("Location", "/here"),))
    wire.routes["/here"] = reply(200, b'{"ok": 1}')
    fetched = await fetch(client, wire.url("/moved"))
    assert fetched.body == b'{"ok": 1}'
    assert moved.pushed < 16 * MIB


@functools.cache
def bomb(coding: str) -> bytes:
    """128 MiB of zeros, compressed: 24 KB as br, 128 KB as gzip or deflate."""
    zeros = bytes(MIB)
    if coding == "br":
        packer = brotli.Compressor(quality=1)
        return bytes(b"".join(packer.process(zeros) for _ in range(128)) + packer.finish())
    level = zlib.compressobj(9, zlib.DEFLATED, 31 if coding == "gzip" else 15)
    return b"".join(level.compress(zeros) for _ in range(128)) + level.flush()


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The most memory Python held at once inside the block (``[bytes]``, set on exit)."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@pytest.mark.parametrize("coding", ["br", "gzip", "deflate"])
async def test_a_compression_bomb_is_refused_without_being_expanded(
    client: httpx.AsyncClient, wire: Wire, coding: str
) -> None:
    wire.routes["/bomb"] = reply(200, bomb(coding), (("Content-Encoding", coding),))
    with peak_memory() as peak, pytest.raises(FetchPermanent) as exc_info:
        await fetch(client, wire.url("/bomb"), max_bytes=MIB)
    assert exc_info.value.code == "response_too_large"
    assert peak[0] < 16 * MIB  # httpx alone decoded 64 MiB (gzip) or 128 MiB (br) at once


@pytest.mark.parametrize("status", [500, 302])
async def test_a_compression_bomb_in_a_body_coleta_does_not_keep_is_not_expanded(
    client: httpx.AsyncClient, wire: Wire, status: int
) -> None:
    headers = (("Content-Encoding", "br"), ("Location", "/here"))
    wire.routes["/bomb"] = reply(status, bomb("br"), headers)
    wire.routes["/here"] = reply(200, b"{}")
    with peak_memory() as peak:
        try:
            outcome: Any = await fetch(client, wire.url("/bomb"))
        except FetchTransient as exc:
            outcome = exc
    assert (outcome.status if status == 500 else outcome.body) == (500 if status == 500 else b"{}")
    assert peak[0] < 16 * MIB


async def test_compressed_bodies_still_decode_whole(client: httpx.AsyncClient, wire: Wire) -> None:
    text = b'{"text": "' + b"compressible " * 100_000 + b'"}'
    packed = brotli.compress(gzip.compress(text))  # decoded from the last coding named
    wire.routes["/both"] = reply(200, packed, (("Content-Encoding", "gzip, br"),))
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    wire.routes["/raw"] = reply(
        200, raw_deflate.compress(text) + raw_deflate.flush(), (("Content-Encoding", "deflate"),)
    )
    wire.routes["/odd"] = reply(200, b"as is", (("Content-Encoding", "identity, zzz"),))
    for path in ("/both", "/raw"):
        with contextlib.closing(await fetch(client, wire.url(path), max_bytes=2 * MIB)) as got:
            assert got.content() == text, path  # spooled: over a MiB
    assert (await fetch(client, wire.url("/odd"))).body == b"as is"


# -- 3. a request without a body sends none, on every hop


@pytest.mark.parametrize(
    ("method", "status"), [("GET", 302), ("GET", 301), ("GET", 307), ("POST", 303)]
)
async def test_a_redirected_request_without_a_body_sends_none(
    client: httpx.AsyncClient, wire: Wire, method: str, status: int
) -> None:
    wire.routes["/start"] = reply(status, headers=(("Location", "/next"),))
    wire.routes["/next"] = reply(200, b'{"page": 2}')
    wire.routes["/again"] = reply(200, b'{"page": 3}')
    body = {"q": "{source}"} if method == "POST" else None
    source = source_config(wire.url("/start"), method=method, body=body)
    fetched = await send(
        client, build_request(client, source, window("Europe/Berlin")), source="rates", max_bytes=99
    )
    # The same kept-alive connection: a stray chunk terminator would be read as a request.
    again = await fetch(client, wire.url("/again"))
    assert wire.violations == []
    assert (fetched.body, again.body) == (b'{"page": 2}', b'{"page": 3}')
    assert [(e.method, e.target) for e in wire.exchanges] == [
        (method, "/start"),
        ("GET", "/next"),
        ("GET", "/again"),
    ]
    assert wire.connections == 1


async def test_a_body_kept_through_a_307_goes_out_whole_with_its_length(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    wire.routes["/start"] = reply(307, headers=(("Location", "/next"),))
    wire.routes["/next"] = reply(200, b"{}")
    source = source_config(wire.url("/start"), method="POST", body={"q": "{source}"})
    await send(
        client, build_request(client, source, window("Europe/Berlin")), source="rates", max_bytes=99
    )
    first, second = wire.exchanges
    assert first.body == second.body == b'{"q":"rates"}'
    assert second.header("content-length") == "13"
    assert second.header("transfer-encoding") is None


# -- 5. the OAuth token endpoint: the same bounds and classes, with code "auth"


def oauth(wire: Wire, client: httpx.AsyncClient) -> httpx.Auth:
    config = OAuth2Auth(token_url=wire.url("/token"), client_id="c", client_secret="s3cret")
    flow = Credentials(client).for_config("rates", config)
    assert flow is not None
    return flow


async def fetch_with_token(client: httpx.AsyncClient, wire: Wire) -> Any:
    request = client.build_request("GET", wire.url("/data"), timeout=httpx.Timeout(5.0))
    return await send(client, request, source="rates", max_bytes=99, auth=oauth(wire, client))


TOKEN = reply(200, b'{"access_token": "tok-1", "expires_in": 3600}')


@pytest.mark.parametrize(
    ("answer", "kind", "says"),
    [
        pytest.param(
            Endless(200, b'{"access_token": "'), FetchPermanent, "larger than", id="endless-200"
        ),
        pytest.param(
            Endless(500, b'{"error": "overloaded"}'), FetchTransient, "HTTP 500", id="endless-500"
        ),
        pytest.param(
            reply(200, b'{"e": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            FetchPermanent,
            "no access_token",
            id="nested-too-deep",
        ),
        pytest.param(
            reply(302, headers=(("Location", "/token"),)),
            FetchPermanent,
            "too many redirects",
            id="redirect-loop",
        ),
        pytest.param(
            reply(302, headers=(("Location", "http://127.0.0.1:99999/token"),)),
            FetchPermanent,
            "cannot request",
            id="bad-redirect",
        ),
        pytest.param(
            reply(200, b"plain", (("Content-Encoding", "gzip"),)),
            FetchPermanent,
            "Content-Encoding",
            id="bad-encoding",
        ),
    ],
)
async def test_a_hostile_token_endpoint_fails_the_request_with_code_auth(
    client: httpx.AsyncClient,
    wire: Wire,
    answer: Answer,
    kind: type[Exception],
    says: str,
) -> None:
    wire.routes["/token"] = answer
    wire.routes["/data"] = reply(200, b"{}")
    with pytest.raises(kind) as exc_info:
        await fetch_with_token(client, wire)
    error = exc_info.value
    assert isinstance(error, FetchTransient | FetchPermanent)
    assert (error.code, error.url) == ("auth", wire.url("/token"))
    assert str(error).startswith("OAuth token request")
    assert wire.url("/token") in str(error)
    assert says in str(error)
    assert "s3cret" not in str(error)
    if isinstance(answer, Endless):
        assert answer.pushed < 16 * MIB
    assert [e.target for e in wire.exchanges if e.target == "/data"] == []


async def test_an_endless_401_before_the_token_is_fetched_again_is_not_read(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    tokens = iter([b"tok-1", b"tok-2"])

    async def token(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        return await reply(200, b'{"access_token": "%s"}' % next(tokens))(exchange, writer)

    refused = Endless(401, b'{"error": "invalid_token"}')

    async def data(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        if exchange.header("authorization") == "Bearer tok-1":
            return await refused(exchange, writer)
        return await reply(200, b'{"ok": 1}')(exchange, writer)

    wire.routes["/token"], wire.routes["/data"] = token, data
    fetched = await fetch_with_token(client, wire)
    assert fetched.body == b'{"ok": 1}'
    assert refused.pushed < 16 * MIB


# -- headers no parser expects


async def test_a_retry_after_that_only_looks_like_digits_is_ignored(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    # b"\xb2" is not UTF-8: httpx reads it as Latin-1 '²', which str.isdigit() accepts.
    wire.routes["/busy"] = reply(503, b"busy", (("Retry-After", "\xb2"),))
    with pytest.raises(FetchTransient) as exc_info:
        await fetch(client, wire.url("/busy"))
    error = exc_info.value
    assert (error.code, error.status, error.retry_after_s) == ("http_status", 503, None)


async def test_a_configured_header_that_is_not_ascii_goes_out_as_utf8(
    client: httpx.AsyncClient, wire: Wire
) -> None:
    wire.routes["/data"] = reply(200, b"{}")
    source = source_config(wire.url("/data"), headers={"X-City": "São Paulo"})
    await send(
        client, build_request(client, source, window("Europe/Berlin")), source="rates", max_bytes=99
    )
    assert wire.exchanges[0].header("x-city") == "São Paulo".encode().decode("latin-1")


async def test_a_header_name_that_is_not_ascii_is_permanent_bad_request(
    client: httpx.AsyncClient,
) -> None:
    source = source_config("http://api.example/", headers={"X-Città": "Roma"})
    with pytest.raises(FetchPermanent) as exc_info:
        build_request(client, source, window("Europe/Berlin"))
    assert exc_info.value.code == "bad_request"
    assert str(exc_info.value) == (
        "coleta cannot send this request to http://api.example/:"
        " a header or the URL holds what it cannot carry (UnicodeEncodeError)"
    )


# -- end to end: the run fails at once, into the dead-letter stream, instead of coming back


@pytest.mark.parametrize(
    ("route", "code"),
    [
        ({"status": 302, "headers": {"Location": "/api"}}, "too_many_redirects"),
        ({"status": 302, "headers": {"Location": "http://127.0.0.1:99999/"}}, "bad_redirect"),
        ({"body": b"plain", "headers": {"Content-Encoding": "gzip"}}, "bad_encoding"),
    ],
    ids=["redirect-loop", "bad-redirect", "bad-encoding"],
)
async def test_a_run_meeting_a_hostile_answer_fails_once_with_its_code(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    route: dict[str, Any],
    code: str,
) -> None:
    api.route("/api", **route)
    config = collect_source(api, "hostile", "/api", retries={"max_attempts": 3})
    async with open_daemon(make_settings([config])):
        row = await run(request_reply, db_conn, "hostile")
    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", code, 1)


@pytest.mark.parametrize(
    ("route", "pagination"),
    [
        (
            {"json": {"items": [1], "next": "http://[::1/page/2"}},
            {"kind": "next_url", "next_url_path": "next"},
        ),
        (
            {"json": {"items": [1]}, "headers": {"Link": '<http://[::1/page/2>; rel="next"'}},
            {"kind": "link"},
        ),
        (
            {"json": {"items": [1], "next": "http://127.0.0.1:99999/page/2"}},
            {"kind": "next_url", "next_url_path": "next"},
        ),
    ],
    ids=["next_url-unparsable", "link-unparsable", "next_url-port-out-of-range"],
)
async def test_a_next_page_link_coleta_cannot_request_fails_the_run_with_bad_url(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    route: dict[str, Any],
    pagination: dict[str, Any],
) -> None:
    api.route("/pages", **route)
    config = collect_source(api, "paged", "/pages", pagination=pagination, records_path="items")
    async with open_daemon(make_settings([config])):
        row = await run(request_reply, db_conn, "paged")
    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", "bad_url", 1)
    assert "http://[::1" in row["error"] or "port 99999" in row["error"]
