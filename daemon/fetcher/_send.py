"""Sending one request: read the body within its limit, and map every failure.

Whatever a request raises (httpx, the transport under it, a header or URL that cannot be
encoded) leaves ``send`` as a ``FetchTransient`` or ``FetchPermanent``, classified by
``errors.from_httpx`` in one place, so the fetcher decides from the branch alone. An
unsuccessful response is classified by the retry predicate (``is_retryable_status``): retry
connection errors, timeouts, 429 and 5xx; never any other 4xx. A large body is spooled to a
temporary file as it arrives (``Fetched.spool``), never whole in memory.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import httpx

from daemon.errors import FetchPermanent, FetchTransient, from_httpx
from daemon.fetcher._client import parse_retry_after, start_of
from daemon.fetcher._decode import decoded
from daemon.platform.redact import redact_headers, redact_text, redact_url

__all__ = ["SPOOL_OVER", "Fetched", "is_retryable_status", "send"]

#: A stored body is decoded this much at a time at most (then checked against its limit).
_DECODE_PIECE = 1024 * 1024
#: A body is written to its temporary file this much at a time (in a worker thread).
_SPILL_BYTES = 1024 * 1024
#: Bodies up to this size stay in memory by default (the NATS max payload; see ``send``).
SPOOL_OVER = 1024 * 1024


def is_retryable_status(status: int) -> bool:
    """The retry predicate for HTTP statuses: 429 and 5xx, nothing else."""
    return status == 429 or 500 <= status <= 599


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
    refusal: Callable[[httpx.Response, bytes], str] | None = None,
) -> Fetched:
    """Send, read at most ``max_bytes``, and map every failure into the coleta tree.

    A body larger than ``spool_over`` bytes goes to a temporary file as it arrives
    (``Fetched.spool``), so a 50 MB response is never in memory whole, let alone twice; the
    caller closes it (``Fetched.close``). An unsuccessful response's error carries its status
    and the start of its body: no more than ``ERROR_BODY_BYTES`` of it is read. ``refusal``
    words that error from the response and those bytes, if the default (``HTTP 404 Not Found
    from <url>: <body>``) will not do.

    ``auth`` (``_auth.Credentials.for_source``) adds the source's credentials at send time, so
    the URL recorded here and in spans never carries a key sent as a query parameter; it adds
    them to each hop that goes to their origins, and takes them off any other.
    """
    safe_url = redact_url(str(request.url))
    started = anyio.current_time()
    with _Spool(spool_over) as spool:  # its file is removed if anything below fails
        try:
            response = await client.send(request, stream=True, auth=auth)
            try:
                status = response.status_code
                if not 200 <= status <= 299:
                    body = await _error_body(response)
                    raise _status_error(
                        response, body, source=source, url=safe_url, refusal=refusal
                    )
                raw, coding = _raw_body(response)
                async for chunk in decoded(raw, coding, piece=_DECODE_PIECE):
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
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
            elapsed_s = anyio.current_time() - started
            raise from_httpx(exc, source=source, url=safe_url, elapsed_s=elapsed_s) from exc
    return Fetched(
        status_code=response.status_code,
        headers=redact_headers(dict(response.headers), by_value=False),
        content_type=response.headers.get("content-type"),
        body=body,
        elapsed_ms=(anyio.current_time() - started) * 1000,
        url=safe_url,
        spool=spool.file,
        spool_size=spool.size,
        spool_sha256=sha256,
    )


async def _error_body(response: httpx.Response) -> bytes:
    """The start of an unsuccessful response's body, enough to say what went wrong
    (``start_of``); the rest is never read (closing drops the connection)."""
    raw, coding = _raw_body(response)
    return b"".join([chunk async for chunk in start_of(raw, coding)])


def _raw_body(response: httpx.Response) -> tuple[AsyncIterable[bytes], str | None]:
    """The body as it comes over the wire, and its ``Content-Encoding``; for a body httpx read
    when the response was made (``httpx.MockTransport``), that body as httpx decoded it."""
    if response.is_stream_consumed:
        return _at_once(response.content), None
    return response.aiter_raw(), response.headers.get("content-encoding")


async def _at_once(body: bytes) -> AsyncIterator[bytes]:
    if body:
        yield body


def _status_error(
    response: httpx.Response,
    body: bytes,
    *,
    source: str,
    url: str,
    refusal: Callable[[httpx.Response, bytes], str] | None,
) -> FetchTransient | FetchPermanent:
    """The error for an unsuccessful ``response``: transient, with the ``Retry-After`` it asks
    for, when the retry predicate says so; permanent otherwise."""
    status = response.status_code
    if refusal is not None:
        message = refusal(response, body)
    else:
        reason = response.reason_phrase or ""
        # The body may echo the request URL, key included: redact URLs in it too.
        snippet = redact_text(body[:200].decode("utf-8", "replace").strip())
        message = f"HTTP {status} {reason} from {url}" + (f": {snippet}" if snippet else "")
    if is_retryable_status(status):
        return FetchTransient(
            message,
            source=source,
            url=url,
            status=status,
            code="http_status",
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    return FetchPermanent(message, source=source, url=url, status=status, code="http_status")
