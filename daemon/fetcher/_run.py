"""One run: fetch its pages, publish each as it comes, and end it — ack, retry, or fail.

A paginated run publishes each page as it is fetched (``page`` = 0, 1, 2 …, ``last`` on the
final one), up to 64 unconfirmed at a time, and marks its ``PageState`` in the
``<prefix>_progress`` bucket (``_progress.PagesInFlight``), so a retry starts at the page that
failed. A one-request run sends the validators the writer remembered (``<prefix>_sources``,
``contracts.SourceState``) and ends ``unchanged`` on a 304, or on the same body with
``skip_unchanged``. The command is acked only after JetStream has accepted every page.

An API failure that may pass (``FetchTransient``) is retried within the source's
``retries.max_attempts``: the command is handed back with ``nak`` and a delay (its
``Retry-After``, else backoff with full jitter), so the worker is freed at once. A permanent
one fails the run (``_events.RunEvents.fail``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import httpx
import msgspec

from contracts import CollectCommand, SourceState
from daemon.errors import (
    FetchPermanent,
    FetchTransient,
    PaginationError,
    PermanentError,
    TransientError,
)
from daemon.fetcher._auth import Credentials
from daemon.fetcher._events import RunEvents, page_payload
from daemon.fetcher._pagination import PageState, first_page_params, next_page
from daemon.fetcher._progress import PagesInFlight, Progress, paging, param_value
from daemon.fetcher._request import build_request, next_request
from daemon.fetcher._send import Fetched, send
from daemon.ids import progress_key
from daemon.platform import metrics, spans
from daemon.platform.bus import Bus, Msg, deliveries
from daemon.platform.logs import get_logger
from daemon.platform.redact import redact_url
from daemon.platform.retry import Backoff
from daemon.settings import SourceConfig
from daemon.template import Window

__all__ = ["Runs", "Started"]

log = get_logger("fetcher")

_decode_state = msgspec.json.Decoder(SourceState).decode
#: A source with nothing stored for its next run.
_NO_STATE = SourceState()


@dataclass(slots=True)
class Started:
    """One attempt of a run: when it started, and whether the writer has heard of it yet
    (a page, or a ``FetchStarted`` for a slow run or one handed back for a retry)."""

    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    reported: bool = False


class Runs:
    """Fetches runs with the shared client and publishes what each one got."""

    def __init__(self, bus: Bus, http: httpx.AsyncClient, events: RunEvents) -> None:
        self._bus = bus
        self._http = http
        self._events = events
        #: Each source's credentials; OAuth tokens are cached here across runs.
        self._credentials = Credentials(http)
        #: Sources whose last run here found no stored state and got no validators to keep:
        #: their next run asks nothing of the ``<prefix>_sources`` bucket (a round trip).
        self._stateless: set[str] = set()

    async def run(
        self,
        msg: Msg,
        command: CollectCommand,
        source: SourceConfig,
        attempt: int,
        started: Started,
    ) -> None:
        """Fetch one run and publish its outcome; ack, or nak for a retry.

        The outcome carries the run's queued and started times: a quick run publishes no
        ``FetchStarted`` (the fetcher's keep-alive reports a slow one, ``report_started``).
        """
        try:
            await self._collect(source, command, attempt, started)
        except FetchTransient as exc:
            retries = source.retries
            if attempt < retries.max_attempts and not self.last_delivery(msg):
                # Its record shows the attempt (fetching) while the command waits.
                await self.report_started(command, attempt, started)
                delay = exc.retry_after_s
                if delay is None:
                    delay = Backoff(1.0, retries.max_backoff_s, jitter=True).delay(attempt)
                log.warning(
                    "fetch.retry",
                    extra=_failure_fields(command, attempt, exc) | {"retry_in_s": delay},
                )
                metrics.record_retry(command.source, exc.code)
                await msg.nak(delay=delay)
                return
            await self._bus.kv_delete(self._bus.progress, progress_key(command))
            await self._events.fail(
                msg, command, attempt, exc.code, str(exc), exc.status, exc.url, started.at
            )
            return
        except PermanentError as exc:
            await self._bus.kv_delete(self._bus.progress, progress_key(command))
            await self._events.fail(
                msg,
                command,
                attempt,
                exc.code,
                str(exc),
                getattr(exc, "status", None),
                getattr(exc, "url", None),
                started.at,
            )
            return
        await msg.ack()

    async def report_started(self, command: CollectCommand, attempt: int, started: Started) -> None:
        """Publish ``FetchStarted`` for this attempt unless the writer has heard of it."""
        if not started.reported:
            started.reported = True
            await self._events.started(command, attempt, started.at)

    def last_delivery(self, msg: Msg) -> bool:
        """Whether JetStream will not deliver this message again after a ``nak``."""
        return deliveries(msg) >= self._bus.options.fetch_max_deliver

    async def _collect(
        self, source: SourceConfig, command: CollectCommand, attempt: int, started: Started
    ) -> None:
        """Fetch the run's pages, publishing each one as it comes.

        A paginated run marks its ``PageState`` in the progress bucket as it goes, so the next
        attempt starts at the page that failed. A one-request run sends the validators of the
        last stored response and may end ``unchanged``.
        """
        window = Window(
            source=source.name,
            run_id=command.run_id,
            scheduled_for=command.scheduled_for,
            interval_start=command.interval_start or source.cron.prev_before(command.scheduled_for),
            tz=source.cron.tz,
        )
        pagination = paging(source)
        known = await self._source_state(source)
        first_params = first_page_params(pagination) if pagination is not None else {}
        if source.incremental is not None:
            since = param_value(known.cursor, source.incremental.initial)
            if since is not None:
                first_params[source.incremental.param] = since
        validators: dict[str, str] = {}
        if pagination is None and source.conditional:
            if known.etag:
                validators["If-None-Match"] = known.etag
            if known.last_modified:
                validators["If-Modified-Since"] = known.last_modified
        first = build_request(
            self._http, source, window, extra_params=first_params, extra_headers=validators
        )
        progress = Progress()
        key = progress_key(command)
        if pagination is not None:
            stored = await self._bus.kv_get(self._bus.progress, key)
            if stored is not None:
                progress = Progress.load(stored, first.url)
                log.info(
                    "fetch.resumed",
                    extra={"source": source.name, "run_id": command.run_id, "page": progress.page},
                )
        pages = PagesInFlight(self._bus, key, progress)
        try:
            fetched = await self._walk(
                source, command, attempt, first, validators, known, pages, started
            )
        except FetchTransient:
            # The API failed page N: pages before it are confirmed and marked, so the retry
            # starts at page N (a crash, instead, restarts from the last mark).
            with contextlib.suppress(TransientError):
                await pages.mark()
            raise
        except PermanentError:
            # The run fails, keeping the pages it got: they must be on the bus before the
            # failure is recorded and the command acked (if not, TransientError: tried again).
            await pages.confirm_all()
            raise
        finally:
            pages.forget()
        if fetched is None:
            return
        if pagination is not None:
            await self._bus.kv_delete(self._bus.progress, key)
        # Per run: debug (a fan-out of hundreds of sources would log hundreds of lines); a
        # failed run logs fetch.failed at error.
        log.debug(
            "fetch.done",
            extra={
                "source": command.source,
                "run_id": command.run_id,
                "http_status": fetched.status_code,
                "pages": progress.page + 1,
                "bytes": progress.run_bytes,
                "elapsed_ms": round(fetched.elapsed_ms, 1),
            },
        )

    async def _walk(
        self,
        source: SourceConfig,
        command: CollectCommand,
        attempt: int,
        first: httpx.Request,
        validators: dict[str, str],
        known: SourceState,
        pages: PagesInFlight,
        started: Started,
    ) -> Fetched | None:
        """Fetch and send page after page; the last page's response, or None when the run
        ended ``unchanged``. Every page sent is confirmed before this returns."""
        pagination = paging(source)
        progress = pages.progress
        deadline = anyio.current_time() + source.total_timeout_s
        while True:
            state = progress.state
            request = first if state.url is None else next_request(first, state.url, source=source)
            try:
                fetched = await self._fetch(source, command, request, deadline)
            except FetchPermanent as exc:
                if exc.status == 304 and validators:
                    started.reported = True
                    why = "not modified (HTTP 304)"
                    await self._events.unchanged(command, attempt, 304, why, started.at)
                    return None
                raise
            with contextlib.closing(fetched):  # a spooled body's file goes once it is sent
                body_sha256 = fetched.sha256() if pagination is None else None
                if source.skip_unchanged and body_sha256 and body_sha256 == known.body_sha256:
                    started.reported = True
                    why = "same body as the last stored run"
                    await self._events.unchanged(
                        command, attempt, fetched.status_code, why, started.at
                    )
                    return None
                nxt: PageState | None = None
                facts = await progress.add(source, fetched)  # rows, cursor, fields: one decode
                if pagination is not None:
                    headers = httpx.Headers(fetched.headers)
                    try:
                        nxt = next_page(pagination, state, request.url, headers, facts.fields)
                    except PaginationError as exc:
                        raise FetchPermanent(
                            f"page {state.page}: {exc}",
                            source=source.name,
                            url=fetched.url,
                            status=fetched.status_code,
                            code=exc.code,
                        ) from exc
                payload = page_payload(
                    command,
                    attempt,
                    fetched,
                    source=source,
                    progress=progress,
                    last=nxt is None,
                    body_sha256=body_sha256,
                    had_state=known != _NO_STATE,
                    started_at=started.at,
                )
                if pagination is None and not source.incremental:
                    if payload.remember:
                        self._stateless.discard(source.name)
                    else:
                        self._stateless.add(source.name)
                started.reported = True  # the page tells the writer
                await pages.add(await self._events.send_page(command, payload, fetched))
            if nxt is None:
                await pages.confirm_all()
                return fetched
            progress.state = nxt
            if pages.mark_due():
                await pages.mark()

    async def _source_state(self, source: SourceConfig) -> SourceState:
        """What the last stored run left for this one (validators, cursor), from the
        ``<prefix>_sources`` mirror of ``source_state`` (written by the writer).

        Not asked when the source cannot use it (validators are for one-request runs), nor
        when its last run in this process found none and kept none (``_stateless``): an API
        that starts sending validators has them kept by that very run, and read from then on.
        """
        one_request = source.pagination is None
        wanted = source.incremental or (
            one_request and (source.conditional or source.skip_unchanged)
        )
        if not wanted or (not source.incremental and source.name in self._stateless):
            return _NO_STATE
        raw = await self._bus.kv_get(self._bus.sources, source.name)
        if raw is None:
            return _NO_STATE
        try:
            return _decode_state(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _NO_STATE

    async def _fetch(
        self, source: SourceConfig, command: CollectCommand, request: httpx.Request, deadline: float
    ) -> Fetched:
        """Send one request of the run; the attempt's pages share ``total_timeout_s``."""
        url = redact_url(str(request.url))
        with spans.http_span(
            request.method, url, request.url.host, source=source.name, run_id=command.run_id
        ) as span:
            started = anyio.current_time()
            try:
                with anyio.fail_after(max(0.0, deadline - started)):
                    fetched = await send(
                        self._http,
                        request,
                        source=source.name,
                        max_bytes=source.max_response_bytes,
                        auth=self._credentials.for_source(source),
                        spool_over=self._events.inline_bytes(),
                    )
            except TimeoutError as exc:
                span.set_attribute("error.type", "timeout")
                _record_http(source, request, started, error_type="timeout")
                raise FetchTransient(
                    f"the run took longer than total_timeout_s ({source.total_timeout_s:g} s)",
                    source=source.name,
                    url=url,
                    code="timeout",
                ) from exc
            except (TransientError, PermanentError) as exc:
                status = getattr(exc, "status", None)
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                span.set_attribute("error.type", exc.code)
                _record_http(source, request, started, status=status, error_type=exc.code)
                raise
            span.set_attribute("http.response.status_code", fetched.status_code)
            span.set_attribute("http.response.body.size", fetched.size)
            _record_http(
                source, request, started, status=fetched.status_code, body_bytes=fetched.size
            )
            return fetched


def _record_http(
    source: SourceConfig,
    request: httpx.Request,
    started: float,
    *,
    status: int | None = None,
    error_type: str | None = None,
    body_bytes: int | None = None,
) -> None:
    url = request.url
    metrics.record_http_request(
        source.name,
        method=request.method,
        server_address=url.host,
        server_port=url.port or (443 if url.scheme == "https" else 80),
        duration_s=anyio.current_time() - started,
        status_code=status,
        error_type=error_type,
        body_bytes=body_bytes,
    )


def _failure_fields(
    command: CollectCommand, attempt: int, exc: FetchTransient
) -> dict[str, object]:
    return {
        "source": command.source,
        "run_id": command.run_id,
        "attempt": attempt,
        "http_status": exc.status,
        "error_code": exc.code,
        "error": str(exc),
    }
