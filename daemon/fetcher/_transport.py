"""An httpx transport on aiohttp: the httpx client API over a cheaper HTTP/1.1 engine.

httpx's own transport (httpcore) costs two to three times the CPU per request of aiohttp's
C-accelerated client (performance issue 7), so the shared client (``_client.open_client``) sends
through :class:`AiohttpTransport`. httpx still builds every request (headers, cookies, auth,
params) and follows redirects (``_send`` decodes bodies, ``_decode``); aiohttp only moves the
bytes, and sends the URL and headers exactly as httpx built them. A body httpx holds goes out
with its length (none at all when empty: a GET never carries a chunked ``0``); only a streamed
one is chunked.

Every aiohttp failure is translated here, so callers only ever see httpx's tree::

    ConnectionTimeoutError (connect timeout)             -> httpx.ConnectTimeout
    SocketTimeoutError (nothing read within the timeout) -> httpx.ReadTimeout
    no free connection slot within the pool timeout      -> httpx.PoolTimeout
    ClientConnectorError (refused, DNS, TLS, unreachable) -> httpx.ConnectError
    ServerDisconnectedError, ClientPayloadError,
    ClientResponseError (malformed response, huge head)  -> httpx.RemoteProtocolError
    any other connection or OS error                     -> httpx.ReadError
    a request aiohttp refuses to send (ValueError)       -> httpx.LocalProtocolError
    a URL that is not http:// or https://                -> httpx.UnsupportedProtocol
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

import aiohttp
import anyio
import httpx
import yarl
from httpx._utils import get_environment_proxies  # the exact rules httpx applies itself

__all__ = ["AiohttpTransport", "environment_proxy_mounts", "tls_context"]

#: httpcore accepts a response head of up to 100 KiB; let a single line or header use all of it.
MAX_HEAD_LINE = 100 * 1024
#: aiohttp counts headers rather than bytes (its default is 128).
MAX_HEADERS = 256
#: httpx always sets these itself; aiohttp must not add them when a request drops one.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
DEFAULT_LIMITS = httpx.Limits()


def tls_context() -> ssl.SSLContext:
    """The certificates httpx would trust: certifi's, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``.

    One context per process and setting, shared by every client: loading a CA bundle takes
    tens of milliseconds, and every daemon start (each worker, each reload) opens a client.
    """
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    context = httpx.create_ssl_context()  # reads the same two variables
    context.set_alpn_protocols(["http/1.1"])
    return context


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests through one pooled ``aiohttp.ClientSession``.

    The session opens when the client is entered (or on the first request: aiohttp wants a
    running loop) and closes with the client (``aclose``). ``limits.max_connections`` bounds
    the connections in use; waiting for one is bounded by the request's pool timeout.
    """

    def __init__(self, *, limits: httpx.Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        slots = limits.max_connections
        self._slots = asyncio.Semaphore(slots) if slots else None
        self._session: aiohttp.ClientSession | None = None
        self._ssl = tls_context()

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._open()
        return self

    def _open(self) -> aiohttp.ClientSession:
        keepalive: dict[str, Any] = {}
        if self._limits.keepalive_expiry is not None:
            keepalive["keepalive_timeout"] = self._limits.keepalive_expiry
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0, ssl=self._ssl, **keepalive
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # httpx keeps the cookies
            skip_auto_headers=_NO_AUTO_HEADERS,
            auto_decompress=False,  # httpx decodes the body itself
            timeout=aiohttp.ClientTimeout(),  # every request carries httpx's timeouts
            max_line_size=MAX_HEAD_LINE,
            max_field_size=MAX_HEAD_LINE,
            max_headers=MAX_HEADERS,
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            if not url.scheme:
                raise httpx.UnsupportedProtocol(
                    "Request URL is missing an 'http://' or 'https://' protocol."
                )
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{url.scheme}://'."
            )
        timeouts = request.extensions.get("timeout", {})
        # The target as httpx built it, byte for byte; userinfo became a header, no fragment.
        target = yarl.URL(
            f"{url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}",
            encoded=True,
        )
        headers = [
            (k.decode(), v.decode("utf-8", "surrogateescape")) for k, v in request.headers.raw
        ]
        data: Any
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            if isinstance(request.stream, httpx.ByteStream):
                # A redirect's request: httpx hands on the body it holds (empty for a GET) as
                # a stream, which aiohttp would send chunked, "0" and all, after a GET.
                data = await request.aread() or None
            else:
                data = request.stream  # streamed: aiohttp frames it as chunked itself
                headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        await self._acquire(timeouts.get("pool"))
        try:
            response = await (self._session or self._open()).request(
                request.method,
                target,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=_client_timeout(timeouts.get("connect"), timeouts.get("read")),
                server_hostname=request.extensions.get("sni_hostname"),
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self._release()
            raise _translate(exc) from exc
        except BaseException:
            self._release()
            raise
        version = b"HTTP/1.0" if response.version == (1, 0) else b"HTTP/1.1"
        extensions: dict[str, Any] = {"http_version": version}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("utf-8", "replace")
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, self._release),
            extensions=extensions,
        )

    async def _acquire(self, pool_s: float | None) -> None:
        if self._slots is None:
            return
        if not self._slots.locked():
            await self._slots.acquire()  # free slot: no suspension
            return
        try:
            with anyio.fail_after(pool_s):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout(f"no free connection within {pool_s} s") from None

    def _release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class _Body(httpx.AsyncByteStream):
    """The response body as aiohttp receives it; closing frees the connection slot."""

    def __init__(self, response: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self._response = response
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        if self._release is None:
            return
        response, release, self._release = self._response, self._release, None
        if response.content.is_eof():
            response.release()  # body complete: the connection goes back to the pool
        else:
            response.close()  # abandoned mid-body: the connection cannot be reused
        release()


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float | None, read: float | None) -> aiohttp.ClientTimeout:
    """httpx's connect and read timeouts as aiohttp's (its ``connect`` covers DNS, TCP and TLS;
    ``sock_read`` is the longest wait for the next bytes). Write has no aiohttp equivalent."""
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)


def _translate(exc: BaseException) -> httpx.TransportError:
    """The httpx error for an aiohttp one, with a message that never repeats the URL (aiohttp
    puts the whole URL, query string and any key in it included, into some of its messages)."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        message = exc.message or f"malformed response ({exc.status})"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout("timed out while connecting")
    if isinstance(exc, TimeoutError):  # SocketTimeoutError and any other read-side timeout
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return httpx.ProxyError(message)
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerFingerprintMismatch):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.NonHttpUrlClientError | aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol("the URL is not a valid http:// or https:// URL")
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError,
    ):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return httpx.ReadError(message)
    return httpx.LocalProtocolError(message)


def environment_proxy_mounts(
    limits: httpx.Limits = DEFAULT_LIMITS,
) -> dict[str, httpx.AsyncBaseTransport | None]:
    """``mounts=`` for a client with a custom transport: httpx honours HTTP_PROXY, HTTPS_PROXY,
    ALL_PROXY and NO_PROXY only when it builds its own transport, so do what it would do —
    proxied URLs through httpx's proxy transport, NO_PROXY hosts through ours (``None``)."""
    return {
        pattern: None if proxy is None else httpx.AsyncHTTPTransport(proxy=proxy, limits=limits)
        for pattern, proxy in get_environment_proxies().items()
    }
