"""The one HTTP client every fetch shares, and what it does to every hop.

Pooled connections (``_transport``), redirects followed only to URLs coleta can request, no
cookies, and request and response hooks that every hop passes (the request, each redirect, a
later page): the credential scope (``_scope``) puts or takes credentials, the host's gate
paces it (``_ratelimit``), and a body coleta does not store (an error's, a redirect's) is read
no further than ``ERROR_BODY_BYTES``, decoded a bounded piece at a time (``_decode``).
"""

from __future__ import annotations

import contextlib
import email.utils
import http.cookiejar
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx

from daemon import __version__
from daemon.errors import RedirectRefused
from daemon.fetcher._decode import decoded
from daemon.fetcher._ratelimit import RATE_EXTENSION, HostGates, reset_after
from daemon.fetcher._scope import CREDENTIALS, CredentialScope
from daemon.fetcher._transport import AiohttpTransport, environment_proxy_mounts
from daemon.platform.redact import shown_url
from daemon.template import parse_url

__all__ = [
    "ERROR_BODY_BYTES",
    "RETRY_AFTER_CAP_S",
    "USER_AGENT",
    "open_client",
    "parse_retry_after",
    "start_of",
]

USER_AGENT = f"coleta/{__version__}"
#: Longest ``Retry-After`` we honour; an API asking for more gets retried at this cap.
RETRY_AFTER_CAP_S = 15 * 60.0
#: The most of a body coleta does not store that is ever read (raw, and decoded): an error's,
#: a redirect's.
ERROR_BODY_BYTES = 4 * 1024


@contextlib.asynccontextmanager
async def open_client(
    *, max_connections: int = 32, gates: HostGates | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The one client every fetch shares: pooled connections, redirects followed (only to URLs
    coleta can request), bodies it does not store cut at ``ERROR_BODY_BYTES``, and every
    request paced per host by ``gates`` (``_ratelimit``; a fresh set unless given)."""
    gates = gates or HostGates()

    async def guard(response: httpx.Response) -> None:
        if not 200 <= response.status_code <= 299 and isinstance(
            response.stream, httpx.AsyncByteStream
        ):
            # Decoded here, so httpx must not decode it again (it would decode it whole).
            coding = response.headers.pop("content-encoding", None)
            response.stream = _Capped(response.stream, coding)
        if response.has_redirect_location:
            _check_redirect(response)

    async def scope(request: httpx.Request) -> None:
        # Every hop passes here (an auth flow sees only the first): redirects and later pages
        # follow one rule.
        credentials: CredentialScope | None = request.extensions.get(CREDENTIALS)
        if credentials is not None:
            await credentials.scope(request)

    async def pace(request: httpx.Request) -> None:
        interval = request.extensions.get(RATE_EXTENSION)
        await gates.acquire(request.url.host, interval if isinstance(interval, float) else None)

    async def listen(response: httpx.Response) -> None:
        wait = None
        if response.status_code in (429, 503):
            wait = parse_retry_after(response.headers.get("retry-after"))
        if wait is None:
            wait = reset_after(response.headers)
        if wait:
            gates.hold(response.request.url.host, wait)

    # aiohttp moves the bytes (_transport): about a third of the CPU per request of httpx's own
    # transport. Proxies from the environment still go through httpx's proxy transports.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=16)
    async with httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits),
        mounts=environment_proxy_mounts(limits),
        follow_redirects=True,
        cookies=_NoCookies(),
        headers={"User-Agent": USER_AGENT},
        timeout=httpx.Timeout(30.0),
        event_hooks={"request": [scope, pace], "response": [guard, listen]},
    ) as client:
        yield client


def _check_redirect(response: httpx.Response) -> None:
    location = response.headers["location"]
    try:
        parse_url(location, base=response.request.url)
    except httpx.InvalidURL as exc:
        request = response.request
        raise RedirectRefused(
            location, str(exc), request=request, shown=shown_url(location)
        ) from None


class _Capped(httpx.AsyncByteStream):
    """The start of a body coleta does not store (``start_of``), for httpx, which reads such
    a body whole itself (a redirect's, a 401's before the token is fetched again): a hostile
    API's endless or expanding one costs no more. Closing drops the connection unless the body
    was read to its end (``_transport._Body``)."""

    def __init__(self, stream: httpx.AsyncByteStream, content_encoding: str | None) -> None:
        self._stream = stream
        self._coding = content_encoding

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in start_of(self._stream, self._coding):
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


async def start_of(raw: AsyncIterable[bytes], content_encoding: str | None) -> AsyncIterator[bytes]:
    """At most ``ERROR_BODY_BYTES`` of the body ``raw``, decoded, read from at most as many raw
    bytes. A body that does not decode, or whose connection breaks, just ends: it is not kept."""
    left = ERROR_BODY_BYTES
    try:
        async for chunk in decoded(_first(raw, left), content_encoding, piece=left):
            yield chunk[:left]
            left -= len(chunk)
            if left <= 0:
                return
    except (httpx.TransportError, httpx.DecodingError):
        return


async def _first(raw: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    async for chunk in raw:
        yield chunk[:size]
        size -= len(chunk)
        if size <= 0:
            return


class _NoCookies(http.cookiejar.CookieJar):
    """Keep no cookies: a request carries only what its source configures, and one source's
    session cookie never reaches another source on the same host. (httpx's jar also cost
    0.1 ms a response in the throughput profile, 4 % of the daemon's CPU.)"""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), capped;
    None for anything else (never an exception: it runs in the client's response hook)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # '²' and '١٢' are digits to str, not to HTTP
        return min(float(value), RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return min(max(0.0, (when - now).total_seconds()), RETRY_AFTER_CAP_S)
