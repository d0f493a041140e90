"""The outside world: one shared httpx client, request building, the retry predicate.

httpx exceptions are translated here into the coleta tree (``FetchTransient`` /
``FetchPermanent``), so the fetcher decides from the branch alone. The retry predicate lives in
one place: retry connection errors, timeouts, 429 and 5xx; never any other 4xx.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.cookiejar
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import msgspec

from daemon import __version__
from daemon._ratelimit import RATE_EXTENSION, HostGates, reset_after
from daemon._template import Window, render, render_value
from daemon._tracing import redact_headers, redact_text, redact_url
from daemon._transport import AiohttpTransport, environment_proxy_mounts
from daemon.errors import FetchPermanent, FetchTransient
from daemon.settings import SourceConfig

__all__ = [
    "Fetched",
    "backoff_s",
    "build_request",
    "is_retryable_status",
    "open_client",
    "parse_retry_after",
    "send",
    "status_error",
]

USER_AGENT = f"coleta/{__version__}"
#: Longest ``Retry-After`` we honour; an API asking for more gets retried at this cap.
RETRY_AFTER_CAP_S = 15 * 60.0


@contextlib.asynccontextmanager
async def open_client(
    *, max_connections: int = 32, gates: HostGates | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The one client every fetch shares: pooled connections, redirects followed, and every
    request paced per host by ``gates`` (``_ratelimit``; a fresh set unless given)."""
    gates = gates or HostGates()

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
        event_hooks={"request": [pace], "response": [listen]},
    ) as client:
        yield client


class _NoCookies(http.cookiejar.CookieJar):
    """Keep no cookies: a request carries only what its source configures, and one source's
    session cookie never reaches another source on the same host. (httpx's jar also cost
    0.1 ms a response in the throughput profile, 4 % of the daemon's CPU.)"""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


def is_retryable_status(status: int) -> bool:
    """The retry predicate for HTTP statuses: 429 and 5xx, nothing else."""
    return status == 429 or 500 <= status <= 599


def backoff_s(attempt: int, *, base_s: float = 1.0, cap_s: float = 300.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^(attempt-1))]."""
    return random.uniform(0, min(cap_s, base_s * 2 ** max(0, attempt - 1)))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return min(max(0.0, (when - now).total_seconds()), RETRY_AFTER_CAP_S)


def build_request(
    client: httpx.AsyncClient,
    source: SourceConfig,
    window: Window,
    *,
    url: str | None = None,
    extra_params: Mapping[str, str] | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> httpx.Request:
    """The source's request for one run, with url, params and body templated.

    ``params`` are merged into the URL's own query string (httpx's ``params=`` would replace it).
    ``url`` (a later page's URL, query included) replaces the templated URL and params;
    ``extra_params`` (first page, incremental cursor) and ``extra_headers`` (conditional
    request validators) are added to the request.
    """
    if url is not None:
        target = httpx.URL(url)
    else:
        target = httpx.URL(render(source.url, window))
        if source.params:
            target = target.copy_merge_params(
                {k: render(v, window) for k, v in source.params.items()}
            )
    if extra_params:
        target = target.copy_merge_params(dict(extra_params))
    content: bytes | None = None
    headers = httpx.Headers(source.headers)  # case-insensitive, unlike a dict
    if extra_headers:
        headers.update(extra_headers)
    if isinstance(source.body, dict):
        content = msgspec.json.encode(render_value(source.body, window))
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(source.body, str):
        content = render(source.body, window).encode()
    timeout = httpx.Timeout(source.timeout_s, connect=source.connect_timeout_s)
    return client.build_request(
        source.method,
        target,
        headers=headers,
        content=content,
        timeout=timeout,
        extensions={RATE_EXTENSION: source.rate_interval_s},
    )


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful response, read whole (within the size limit)."""

    status_code: int
    headers: dict[str, str]
    content_type: str | None
    body: bytes
    elapsed_ms: float
    url: str


async def send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    *,
    source: str,
    max_bytes: int,
    auth: httpx.Auth | None = None,
) -> Fetched:
    """Send, read at most ``max_bytes``, and map every failure into the coleta tree.

    ``auth`` (``_auth.Credentials.for_source``) adds the source's credentials at send time, so
    the URL recorded here and in spans never carries a key sent as a query parameter.
    """
    safe_url = redact_url(str(request.url))
    started = anyio.current_time()
    try:
        response = await client.send(request, stream=True, auth=auth)
        try:
            status = response.status_code
            if not 200 <= status <= 299:
                await response.aread()
                raise _status_error(response, source=source, url=safe_url)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise FetchPermanent(
                        f"response from {safe_url} is larger than {max_bytes} bytes",
                        source=source,
                        url=safe_url,
                        status=status,
                        code="response_too_large",
                    )
                chunks.append(chunk)
        finally:
            await response.aclose()
    except httpx.TimeoutException as exc:
        raise FetchTransient(
            f"{type(exc).__name__} after {anyio.current_time() - started:.1f} s from {safe_url}",
            source=source,
            url=safe_url,
            code="timeout",
        ) from exc
    except httpx.TransportError as exc:
        raise FetchTransient(
            f"{type(exc).__name__} for {safe_url}: {exc}",
            source=source,
            url=safe_url,
            code="connect",
        ) from exc
    except httpx.InvalidURL as exc:
        raise FetchPermanent(
            f"invalid URL {safe_url}: {exc}", source=source, url=safe_url, code="bad_request"
        ) from exc
    return Fetched(
        status_code=response.status_code,
        headers=redact_headers(dict(response.headers)),
        content_type=response.headers.get("content-type"),
        body=b"".join(chunks),
        elapsed_ms=(anyio.current_time() - started) * 1000,
        url=safe_url,
    )


def _status_error(
    response: httpx.Response, *, source: str, url: str
) -> FetchTransient | FetchPermanent:
    status = response.status_code
    reason = response.reason_phrase or ""
    # The body may echo the request URL, key included: redact URLs in it too.
    snippet = redact_text(response.content[:200].decode("utf-8", "replace").strip())
    message = f"HTTP {status} {reason} from {url}" + (f": {snippet}" if snippet else "")
    return status_error(message, response, source=source, url=url, code="http_status")


def status_error(
    message: str, response: httpx.Response, *, source: str, url: str, code: str
) -> FetchTransient | FetchPermanent:
    """The error for an unsuccessful ``response``: transient, with the ``Retry-After`` it asks
    for, when the retry predicate says so; permanent otherwise."""
    status = response.status_code
    if is_retryable_status(status):
        return FetchTransient(
            message,
            source=source,
            url=url,
            status=status,
            code=code,
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    return FetchPermanent(message, source=source, url=url, status=status, code=code)
