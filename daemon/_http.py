"""The outside world: one shared httpx client, request building, the retry predicate.

httpx exceptions are translated here into the coleta tree (``FetchTransient`` /
``FetchPermanent``), so the fetcher decides from the branch alone. The retry predicate lives in
one place: retry connection errors, timeouts, 429 and 5xx; never any other 4xx.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.cookiejar
import io
import random
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
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
    "SPOOL_OVER",
    "Fetched",
    "backoff_s",
    "build_request",
    "is_retryable_status",
    "next_request",
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


#: A body is written to its temporary file this much at a time (in a worker thread).
_SPILL_BYTES = 1024 * 1024
#: Bodies up to this size stay in memory by default (the NATS max payload; see ``send``).
SPOOL_OVER = 1024 * 1024


def next_request(first: httpx.Request, url: str, *, source: SourceConfig) -> httpx.Request:
    """A later page's request: the run's first request (method, headers, body, timeouts, rate
    limit) sent to ``url``.

    What ``build_request`` would make for the same source and window, without templating and
    merging it all again (0.16 ms a page in the throughput profile, a fifth of it now). The
    ``Host`` header follows ``url`` unless the source sets its own.
    """
    headers = first.headers.copy()
    if not any(name.lower() == "host" for name in source.headers):
        del headers["host"]  # set again from ``url``, which may be another host
    return httpx.Request(
        first.method,
        url,
        headers=headers,
        content=first.content or None,
        extensions=dict(first.extensions),
    )


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful response, read whole (within the size limit).

    A body of at most ``send``'s ``spool_over`` bytes is ``body``. A larger one is in
    ``spool``, an anonymous temporary file (``body`` is then empty), hashed as it arrived:
    it is read whole only by those who need its content (``content()``), and ``close()``
    removes it.
    """

    status_code: int
    headers: dict[str, str]
    content_type: str | None
    body: bytes
    elapsed_ms: float
    url: str
    spool: io.BufferedIOBase | None = None
    spool_size: int = 0
    spool_sha256: str = ""

    @property
    def size(self) -> int:
        """The body's length in bytes, wherever it is."""
        return self.spool_size if self.spool is not None else len(self.body)

    def sha256(self) -> str:
        """The body's SHA-256, in hex."""
        if self.spool is not None:
            return self.spool_sha256
        return hashlib.sha256(self.body).hexdigest()

    def content(self) -> bytes:
        """The whole body in memory: ``body``, or the spooled body read (one copy)."""
        if self.spool is None:
            return self.body
        self.spool.seek(0)
        return self.spool.read()

    def close(self) -> None:
        """Remove the spooled body, if any (idempotent)."""
        if self.spool is not None:
            self.spool.close()


class _Spool:
    """A body as it arrives: chunks in memory up to ``limit`` bytes; past that, an anonymous
    temporary file (in ``tempfile.gettempdir()``, i.e. ``$TMPDIR`` or ``/tmp``), written and
    hashed in a worker thread a MiB at a time, so no more than that is held in memory."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._pending = 0
        self.size = 0
        self.file: io.BufferedIOBase | None = None
        self._sha256 = hashlib.sha256()

    async def write(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self.size += len(chunk)
        self._pending += len(chunk)
        if self.size > self._limit and (self.file is None or self._pending >= _SPILL_BYTES):
            await self._spill()

    async def _spill(self) -> None:
        chunks, self._chunks, self._pending = self._chunks, [], 0
        if self.file is None:
            self.file = await anyio.to_thread.run_sync(_temporary_file)
        await anyio.to_thread.run_sync(_write_chunks, self.file, self._sha256.update, chunks)

    async def finish(self) -> tuple[bytes, str]:
        """The body when it stayed in memory (else empty), and the SHA-256 of a spooled one."""
        if self.file is None:
            return b"".join(self._chunks), ""  # one chunk: that chunk itself, no copy
        await self._spill()
        return b"", self._sha256.hexdigest()

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:  # failed or cancelled: nobody will close the file
            self._chunks = []
            if self.file is not None:
                self.file.close()


def _temporary_file() -> io.BufferedIOBase:
    return tempfile.TemporaryFile(prefix="coleta-body-")


def _write_chunks(
    file: io.BufferedIOBase, digest: Callable[[bytes], None], chunks: list[bytes]
) -> None:
    for chunk in chunks:
        digest(chunk)
        file.write(chunk)
    file.flush()


async def send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    *,
    source: str,
    max_bytes: int,
    auth: httpx.Auth | None = None,
    spool_over: int = SPOOL_OVER,
) -> Fetched:
    """Send, read at most ``max_bytes``, and map every failure into the coleta tree.

    A body larger than ``spool_over`` bytes goes to a temporary file as it arrives
    (``Fetched.spool``), so a 50 MB response is never in memory whole, let alone twice; the
    caller closes it (``Fetched.close``).

    ``auth`` (``_auth.Credentials.for_source``) adds the source's credentials at send time, so
    the URL recorded here and in spans never carries a key sent as a query parameter.
    """
    safe_url = redact_url(str(request.url))
    started = anyio.current_time()
    with _Spool(spool_over) as spool:  # its file is removed if anything below fails
        try:
            response = await client.send(request, stream=True, auth=auth)
            try:
                status = response.status_code
                if not 200 <= status <= 299:
                    await response.aread()
                    raise _status_error(response, source=source, url=safe_url)
                async for chunk in response.aiter_bytes():
                    if spool.size + len(chunk) > max_bytes:
                        raise FetchPermanent(
                            f"response from {safe_url} is larger than {max_bytes} bytes",
                            source=source,
                            url=safe_url,
                            status=status,
                            code="response_too_large",
                        )
                    await spool.write(chunk)
                body, sha256 = await spool.finish()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise FetchTransient(
                f"{type(exc).__name__} after {anyio.current_time() - started:.1f} s"
                f" from {safe_url}",
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
        body=body,
        elapsed_ms=(anyio.current_time() - started) * 1000,
        url=safe_url,
        spool=spool.file,
        spool_size=spool.size,
        spool_sha256=sha256,
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
