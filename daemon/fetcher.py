"""command → fetch → raw payload: take collect commands, call the API, publish what it said.

A durable pull consumer feeds at most ``max_concurrent_fetches`` runs at once, each in its own
named task. The command is acked only after JetStream has accepted the payload, so a crash at
any point redelivers the command; the payload's ``Nats-Msg-Id`` and the writer's unique
``(run_id, page)`` make the repeat harmless. A transient failure is handed back with ``nak``
and a backoff delay — the worker is freed at once, no source waits behind another's retries.

A paginated run publishes each page as it is fetched (``page`` = 0, 1, 2 …, ``last`` on the
final one; message ids ``{run_id}/r{replay}/p{page}``), up to 64 unconfirmed at a time, and
marks its ``PageState`` in the ``<prefix>_progress`` bucket (``_progress.PagesInFlight``), so a
retry starts at the page that failed. A one-request run sends the validators the writer
remembered (``<prefix>_sources``) and ends ``unchanged`` on a 304, or on the same body with
``skip_unchanged``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import httpx
import msgspec
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from opentelemetry import trace

from contracts import (
    CollectCommand,
    FetchFailed,
    FetchStarted,
    FetchUnchanged,
    RawPayload,
    decoder,
    encode,
)
from daemon import _metrics, _tracing
from daemon._auth import Credentials
from daemon._bus import Bus, Pending, PullSubscription
from daemon._events import envelope, msg_id, page_payload
from daemon._http import Fetched, backoff_s, build_request, next_request, send
from daemon._leases import Lease, Leases
from daemon._logging import get_logger
from daemon._pagination import PageState, PaginationError, first_page_params, next_page
from daemon._progress import PagesInFlight, Progress, paging, param_value, progress_key
from daemon._records import page_fields
from daemon._template import Window
from daemon.errors import FetchPermanent, FetchTransient, PermanentError, TransientError
from daemon.settings import Settings, SourceConfig

__all__ = ["Fetcher"]

log = get_logger("fetcher")

_decode_command = decoder(CollectCommand).decode
#: Room kept for the payload's JSON envelope and headers within the NATS max payload.
_ENVELOPE_BYTES = 16 * 1024
#: Room kept for a message's NATS headers (message id, trace context).
_HEADER_ROOM = 1024
#: How soon a command for a source that is already running is offered again.
_OVERLAP_RETRY_S = 1.0
_MAX_TRACKED_WAITS = 10_000
#: How soon a run whose publish the bus refused is tried again.
_BUS_RETRY_S = 2.0


@dataclass(slots=True)
class _Work:
    """One command being handled: whether it holds a worker slot, and its source lease."""

    msg: Msg
    holds_slot: bool = True
    lease: Lease | None = None


class Fetcher:
    """Consumes ``<prefix>.collect.>`` and publishes run events on ``<prefix>.raw.<source>``."""

    def __init__(self, bus: Bus, http: httpx.AsyncClient, settings: Settings) -> None:
        self._bus = bus
        self._http = http
        #: Each source's credentials; OAuth tokens are cached here across runs.
        self._credentials = Credentials(http)
        self._settings = settings
        self._intake = anyio.CancelScope()
        self._work = anyio.CancelScope()
        self._finished = anyio.Event()
        self._slots = anyio.Semaphore(settings.max_concurrent_fetches)
        self.in_flight = 0
        self._idle = anyio.Event()
        #: Per source: runs of this process queue here (unless allow_overlap).
        self._locks: dict[str, anyio.Lock] = {}
        #: Leases keep runs of one source apart across replicas.
        self._leases = (
            Leases(bus.leases, bus.js, bus.subjects.leases_bucket)
            if bus.leases is not None
            else None
        )
        #: Per run id: times it was handed back because another replica held the lease.
        self._lease_waits: dict[str, int] = {}

    def reload(self, settings: Settings) -> None:
        """Fetch with these sources' configuration from now on (SIGHUP)."""
        self._settings = settings

    def stop_intake(self) -> None:
        """Take no new commands; runs already started go on."""
        self._intake.cancel()

    async def drain(self) -> None:
        """Stop intake and wait until every run in hand is settled."""
        self.stop_intake()
        while self.in_flight:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subjects = self._bus.subjects
        sub = await self._bus.pull(subjects.collect_stream, subjects.fetcher_consumer)
        try:
            with self._work:
                await self._serve(sub, task_status)
        finally:
            await self._bus.unsubscribe(sub)
            self._finished.set()

    def abort(self) -> None:
        """Cancel the runs in hand: each command is handed back (nak) to be done later."""
        self.stop_intake()
        self._work.cancel()

    async def finished(self) -> None:
        """Wait until every run is settled and the fetcher has stopped."""
        await self._finished.wait()

    async def _serve(self, sub: PullSubscription, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            with self._intake:
                while True:
                    # Wait for a free slot, then ask for as many commands as there are slots.
                    async with self._slots:
                        free = self._slots.value + 1
                        msgs = await self._bus.fetch(sub, free)
                    for msg in msgs:
                        await self._slots.acquire()
                        tg.start_soon(self._handle, msg, name=f"fetcher-run-{msg.subject}")
            # Intake stopped: drop our interest now, so a command handed back below is not
            # delivered to this process's last pull request (it would wait out ack_wait).
            await self._bus.unsubscribe(sub)

    async def _handle(self, msg: Msg) -> None:
        self.in_flight += 1
        work = _Work(msg)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_alive, work, name=f"fetcher-progress-{msg.subject}")
                try:
                    await self._process(work)
                except TransientError as exc:
                    # The bus refused a publish (NATS restarting): the run is tried again later.
                    log.warning(
                        "fetch.bus_unavailable", extra={"subject": msg.subject, "error": str(exc)}
                    )
                    await _settle(partial(msg.nak, delay=_BUS_RETRY_S))
                finally:
                    tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            # Shutting down mid-run: hand the command back so the run is done after restart.
            with anyio.CancelScope(shield=True):
                await _settle(msg.nak)
            log.warning("fetch.handed_back", extra={"subject": msg.subject})
            raise
        except Exception:
            log.exception("fetch.crashed", extra={"subject": msg.subject})
            with anyio.CancelScope(shield=True):
                await _settle(lambda: msg.nak(delay=5))
        finally:
            self.in_flight -= 1
            if work.holds_slot:
                self._slots.release()
            if not self.in_flight:
                self._idle.set()

    async def _keep_alive(self, work: _Work) -> None:
        """Tell JetStream the run is alive, so a long fetch is not redelivered to another
        worker, and keep the source's lease from expiring."""
        interval = max(0.5, self._bus.options.ack_wait_s / 3)
        while True:
            await anyio.sleep(interval)
            await _settle(work.msg.in_progress)
            if work.lease is not None and self._leases is not None:
                await self._leases.refresh(work.lease)

    @contextlib.asynccontextmanager
    async def _exclusive(self, source: str, work: _Work) -> AsyncIterator[None]:
        """Queue behind this process's run of ``source``, giving the worker slot back while
        waiting so other sources go on."""
        lock = self._locks.setdefault(source, anyio.Lock())
        if lock.locked():
            self._slots.release()
            work.holds_slot = False
            await lock.acquire()
            try:
                await self._slots.acquire()
            except BaseException:
                lock.release()
                raise
            work.holds_slot = True
        else:
            await lock.acquire()
        try:
            yield
        finally:
            lock.release()

    async def _process(self, work: _Work) -> None:
        msg = work.msg
        try:
            command = _decode_command(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # Poison: it can never become valid. Keep it in the dead-letter stream, never retry.
            log.error("fetch.poison", extra={"subject": msg.subject, "error": str(exc)})
            source_name = msg.subject.split(".")[2]
            await self._bus.dead_letter(
                msg, source=source_name, run_id=None, code="poison", error=str(exc)
            )
            _metrics.record_dead_letter(source_name, "poison", stage="fetcher")
            await msg.term()
            return
        # Hand-backs because another replica was running the source are not attempts.
        delivered = msg.metadata.num_delivered if msg.reply else 1
        attempt = max(1, delivered - self._lease_waits.get(command.run_id, 0))
        consumer = self._bus.subjects.fetcher_consumer
        with _tracing.consumer_span(
            msg.subject,
            msg.headers,
            consumer=consumer,
            source=command.source,
            run_id=command.run_id,
            message_id=command.run_id,
            body_size=len(msg.data),
        ):
            source = self._settings.source(command.source)
            if source is None:
                await self._fail(
                    msg, command, attempt, "unknown_source", "source is not configured"
                )
                await msg.ack()
                return
            if source.allow_overlap or self._leases is None:
                await self._run(msg, command, source, attempt)
                return
            async with self._exclusive(source.name, work):
                lease = await self._leases.acquire(source.name, command.run_id)
                if lease is None:
                    # Another replica is running this source: offer the command again later.
                    if len(self._lease_waits) > _MAX_TRACKED_WAITS:
                        self._lease_waits.clear()  # runs another replica took are never seen again
                    self._lease_waits[command.run_id] = self._lease_waits.get(command.run_id, 0) + 1
                    await msg.nak(delay=_OVERLAP_RETRY_S)
                    return
                work.lease = lease
                try:
                    await self._run(msg, command, source, attempt)
                finally:
                    work.lease = None
                    self._lease_waits.pop(command.run_id, None)
                    with anyio.CancelScope(shield=True):
                        await self._leases.release(lease)

    async def _run(
        self, msg: Msg, command: CollectCommand, source: SourceConfig, attempt: int
    ) -> None:
        """Fetch one run and publish its outcome; ack, or nak for a retry."""
        await self._publish(
            command,
            FetchStarted(
                **envelope(command, attempt),
                started_at=datetime.now(UTC),
            ),
            msg_id=msg_id(command, f"started/{attempt}"),
        )
        try:
            await self._collect(source, command, attempt)
        except FetchTransient as exc:
            retries = source.retries
            if attempt < retries.max_attempts:
                delay = exc.retry_after_s
                if delay is None:
                    delay = backoff_s(attempt, cap_s=retries.max_backoff_s)
                log.warning(
                    "fetch.retry",
                    extra=_failure_fields(command, attempt, exc) | {"retry_in_s": delay},
                )
                _metrics.record_retry(command.source, exc.code)
                await msg.nak(delay=delay)
                return
            await self._fail(msg, command, attempt, exc.code, str(exc), exc.status, exc.url)
            await self._bus.kv_delete(self._bus.progress, progress_key(command))
        except PermanentError as exc:
            await self._fail(
                msg,
                command,
                attempt,
                exc.code,
                str(exc),
                getattr(exc, "status", None),
                getattr(exc, "url", None),
            )
            await self._bus.kv_delete(self._bus.progress, progress_key(command))
        await msg.ack()

    async def _collect(self, source: SourceConfig, command: CollectCommand, attempt: int) -> None:
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
            since = param_value(known.get("cursor"), source.incremental.initial)
            if since is not None:
                first_params[source.incremental.param] = since
        validators: dict[str, str] = {}
        if pagination is None and source.conditional:
            if known.get("etag"):
                validators["If-None-Match"] = str(known["etag"])
            if known.get("last_modified"):
                validators["If-Modified-Since"] = str(known["last_modified"])
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
            fetched = await self._walk(source, command, attempt, first, validators, known, pages)
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
        log.info(
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
        known: dict[str, Any],
        pages: PagesInFlight,
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
                    await self._unchanged(command, attempt, 304, "not modified (HTTP 304)")
                    return None
                raise
            with contextlib.closing(fetched):  # a spooled body's file goes once it is sent
                body_sha256 = fetched.sha256() if pagination is None else None
                if (
                    source.skip_unchanged
                    and body_sha256
                    and body_sha256 == known.get("body_sha256")
                ):
                    await self._unchanged(
                        command, attempt, fetched.status_code, "same body as the last stored run"
                    )
                    return None
                nxt: PageState | None = None
                if pagination is not None:
                    # The next page's fields: a page spooled to disk is read (held once) here.
                    body = page_fields(pagination, fetched.content_type, fetched.content())
                    headers = httpx.Headers(fetched.headers)
                    try:
                        nxt = next_page(pagination, state, request.url, headers, body)
                    except PaginationError as exc:
                        raise FetchPermanent(
                            f"page {state.page}: {exc}",
                            source=source.name,
                            url=fetched.url,
                            status=fetched.status_code,
                            code="pagination_loop",
                        ) from exc
                    del body
                progress.add(source, fetched)
                payload = page_payload(
                    command,
                    attempt,
                    fetched,
                    source=source,
                    progress=progress,
                    last=nxt is None,
                    body_sha256=body_sha256,
                )
                await pages.add(await self._send_payload(command, payload, fetched))
            if nxt is None:
                await pages.confirm_all()
                return fetched
            progress.state = nxt
            if pages.mark_due():
                await pages.mark()

    async def _source_state(self, source: SourceConfig) -> dict[str, Any]:
        """What the last stored run left for this one (validators, cursor), from the
        ``<prefix>_sources`` mirror of ``source_state`` (see ``daemon.writer``)."""
        if not (source.conditional or source.skip_unchanged or source.incremental):
            return {}
        raw = await self._bus.kv_get(self._bus.sources, source.name)
        if raw is None:
            return {}
        try:
            value = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    async def _unchanged(
        self, command: CollectCommand, attempt: int, http_status: int, note: str
    ) -> None:
        log.info(
            "fetch.unchanged",
            extra={"source": command.source, "run_id": command.run_id, "note": note},
        )
        event = FetchUnchanged(
            **envelope(command, attempt),
            finished_at=datetime.now(UTC),
            http_status=http_status,
            note=note,
        )
        await self._publish(command, event, msg_id=msg_id(command, "unchanged"))

    async def _fetch(
        self, source: SourceConfig, command: CollectCommand, request: httpx.Request, deadline: float
    ) -> Fetched:
        """Send one request of the run; the attempt's pages share ``total_timeout_s``."""
        with _tracing.tracer().start_as_current_span(
            f"{request.method}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": request.method,
                "url.full": _tracing.redact_url(str(request.url)),
                "server.address": request.url.host,
                _tracing.COLETA_SOURCE: source.name,
                _tracing.COLETA_RUN_ID: command.run_id,
            },
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
                        spool_over=self._inline_bytes(),
                    )
            except TimeoutError as exc:
                span.set_attribute("error.type", "timeout")
                _record_http(source, request, started, error_type="timeout")
                raise FetchTransient(
                    f"the run took longer than total_timeout_s ({source.total_timeout_s:g} s)",
                    source=source.name,
                    url=_tracing.redact_url(str(request.url)),
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

    async def _fail(
        self,
        msg: Msg,
        command: CollectCommand,
        attempt: int,
        code: str,
        error: str,
        http_status: int | None = None,
        url: str | None = None,
    ) -> None:
        log.error(
            "fetch.failed",
            extra={
                "source": command.source,
                "run_id": command.run_id,
                "attempt": attempt,
                "http_status": http_status,
                "error_code": code,
                "error": error,
            },
        )
        event = FetchFailed(
            **envelope(command, attempt),
            failed_at=datetime.now(UTC),
            error_code=code,
            error=error,
            http_status=http_status,
            url=url,
        )
        # The command goes to the dead-letter stream first: `coleta.dlq.replay` can re-run it.
        await self._bus.dead_letter(
            msg,
            source=command.source,
            run_id=command.run_id,
            code=code,
            error=error,
            msg_id=msg_id(command, "dlq"),
        )
        _metrics.record_dead_letter(command.source, code, stage="fetcher")
        await self._publish(command, event, msg_id=msg_id(command, "failed"))

    def _inline_bytes(self) -> int:
        """The largest body that travels in its payload message: JSON carries bytes as base64,
        4 bytes on the wire for every 3 of the body. Larger ones go to the object store, and
        ``send`` spools them to disk as they arrive."""
        return (self._bus.max_payload - _ENVELOPE_BYTES) * 3 // 4

    async def _send_payload(
        self, command: CollectCommand, payload: RawPayload, fetched: Fetched
    ) -> Pending:
        """Send a page (confirm it later); a body too large for one NATS message goes to the
        object store first, from its spool file when it has one (never whole in memory)."""
        message_id = msg_id(command, f"p{payload.page}")
        encoded: bytes | None = None
        if fetched.spool is None and fetched.size <= self._inline_bytes():
            encoded = encode(payload)
            # The rest of the page (headers up to 100 KiB, a long URL) may not fit either.
            if len(encoded) + _HEADER_ROOM > self._bus.max_payload:
                encoded = None
        if encoded is None:
            name = f"{command.run_id}/{payload.page}"
            body = fetched.spool if fetched.spool is not None else fetched.body
            await self._bus.put_body(name, body)
            encoded = encode(
                msgspec.structs.replace(payload, body=b"", body_ref=name, body_size=fetched.size)
            )
        return await self._bus.send(
            self._bus.subjects.raw(command.source),
            encoded,
            msg_id=message_id,
            source=command.source,
            run_id=command.run_id,
        )

    async def _publish(
        self, command: CollectCommand, event: msgspec.Struct, *, msg_id: str
    ) -> None:
        await self._bus.publish(
            self._bus.subjects.raw(command.source),
            event,
            msg_id=msg_id,
            source=command.source,
            run_id=command.run_id,
        )


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
    _metrics.record_http_request(
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


async def _settle(action: object) -> None:
    """Ack/nak without letting a dead connection turn shutdown into a crash."""
    try:
        await action()  # type: ignore[operator]
    except (nats.errors.Error, OSError) as exc:
        log.warning("fetch.settle_failed", extra={"error": str(exc) or type(exc).__name__})
