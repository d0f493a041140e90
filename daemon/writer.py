"""raw payload → write → Postgres: persist run events in batches, idempotently.

Two durable consumers feed the writer: ``runs`` on the command stream records each run as
``queued`` the moment it is asked for, and ``writer`` on the raw stream stores payloads and run
outcomes. Each batch is one transaction — rows inserted with ``ON CONFLICT (run_id, page,
record) DO NOTHING`` and the runs' records updated alongside — and messages are acked only after
commit. A replayed message therefore inserts nothing twice, and a crash before the ack only
replays.

What rows a page makes, and which column each goes to, is ``daemon._rows``. A body too large
for a NATS message is read from the object store into a temporary file, checked, and streamed
into PostgreSQL with COPY (``_rows.copy_large``): it is never in memory more than once.

Source state (how the next run asks): the last page of a run carries its validators (``ETag``,
``Last-Modified``, body sha256, for one-request runs) and its incremental cursor; they go to the
``source_state`` table in the transaction of the data they came from, so a crash can neither
skip nor repeat a range. The fetcher has no database access: after each commit, and at
start-up, the writer copies the touched rows of ``source_state`` into the key-value bucket
``<prefix>_sources`` (key: source name, value: JSON), which the fetcher reads. PostgreSQL stays
the source of truth; if a copy fails it is logged and the next commit or start-up repairs it
(meanwhile a run may ask for a range again — never skip one).

A batch that PostgreSQL rejects is retried one message per transaction, so one bad row cannot
sink the others; the bad one's run is marked ``failed`` with the reason.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import msgspec
import nats.errors
import psycopg
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from contracts import (
    CollectCommand,
    FetchFailed,
    FetchStarted,
    FetchUnchanged,
    RawPayload,
    RunEvent,
    RunMissed,
    decoder,
)
from daemon import _metrics, _rows, _tracing
from daemon._bus import Bus, PullSubscription, message_trace_id
from daemon._db import Database
from daemon._logging import get_logger
from daemon.errors import StoreUnavailable, TransientError

__all__ = ["Writer"]

log = get_logger("writer")

_event_decoder: msgspec.json.Decoder[RunEvent] = msgspec.json.Decoder(RunEvent)
_decode_event = _event_decoder.decode
_decode_command = decoder(CollectCommand).decode

#: Short pull waits: a stop takes effect after the current one (it is not cancelled).
_FETCH_WAIT_S = 0.5
#: How long a batch waits to be retried while PostgreSQL is unreachable.
_STORE_RETRY_S = 2.0
#: About how many bytes of messages one batch holds (``writer_batch_size`` bounds the count).
BATCH_BYTES = 16 * 1024 * 1024

#: Validators are replaced by a one-request run's (``remember``); the cursor only grows.
UPSERT_SOURCE_STATE = """
INSERT INTO source_state AS s (source, etag, last_modified, body_sha256, cursor, updated_at)
VALUES (%(source)s, %(etag)s, %(last_modified)s, %(body_sha256)s, %(cursor)s::jsonb, now())
ON CONFLICT (source) DO UPDATE SET
    etag          = CASE WHEN %(remember)s THEN EXCLUDED.etag ELSE s.etag END,
    last_modified = CASE WHEN %(remember)s THEN EXCLUDED.last_modified ELSE s.last_modified END,
    body_sha256   = CASE WHEN %(remember)s THEN EXCLUDED.body_sha256 ELSE s.body_sha256 END,
    cursor        = GREATEST(s.cursor, EXCLUDED.cursor),
    updated_at    = now()
"""

SELECT_SOURCE_STATE = """
SELECT source, etag, last_modified, body_sha256, cursor FROM source_state
WHERE %(sources)s::text[] IS NULL OR source = ANY(%(sources)s::text[])
"""

# Status only moves forward: queued → fetching → stored | unchanged | failed; a terminal
# status stays.
# 'missed' is not terminal: a later run of the same slot (catch-up, backfill) replaces it.
# Each dead-letter replay of a run has a higher ``replay`` number: its first event starts the
# record over, and events of an older attempt arriving late change nothing.
UPSERT_RUN = """
INSERT INTO collection_runs AS r
    (run_id, source, trigger, scheduled_for, status, attempts, pages, rows, bytes,
     http_status, error_code, error, trace_id, queued_at, started_at, finished_at, replay,
     note)
VALUES (%(run_id)s, %(source)s, %(trigger)s, %(scheduled_for)s, %(status)s, %(attempts)s,
        %(pages)s, %(rows)s, %(bytes)s, %(http_status)s, %(error_code)s, %(error)s,
        %(trace_id)s, %(queued_at)s, %(started_at)s, %(finished_at)s, %(replay)s, %(note)s)
ON CONFLICT (run_id) DO UPDATE SET
    status = CASE
        WHEN EXCLUDED.status = 'missed' THEN r.status
        WHEN EXCLUDED.replay > r.replay OR r.status = 'missed' THEN EXCLUDED.status
        WHEN EXCLUDED.replay < r.replay OR r.status IN ('stored', 'unchanged', 'failed')
            THEN r.status
        WHEN EXCLUDED.status = 'queued' THEN r.status
        ELSE EXCLUDED.status END,
    attempts    = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.attempts
                       ELSE GREATEST(r.attempts, EXCLUDED.attempts) END,
    pages       = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.pages
                       ELSE GREATEST(r.pages, EXCLUDED.pages) END,
    rows        = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.rows
                       ELSE GREATEST(r.rows, EXCLUDED.rows) END,
    bytes       = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.bytes
                       ELSE GREATEST(r.bytes, EXCLUDED.bytes) END,
    http_status = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.http_status
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed')
                           THEN r.http_status
                       ELSE COALESCE(EXCLUDED.http_status, r.http_status) END,
    error_code  = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.error_code
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed')
                           THEN r.error_code
                       ELSE EXCLUDED.error_code END,
    error       = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.error
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed')
                           THEN r.error
                       ELSE EXCLUDED.error END,
    trace_id    = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.trace_id
                       ELSE COALESCE(r.trace_id, EXCLUDED.trace_id) END,
    queued_at   = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.queued_at
                       ELSE COALESCE(r.queued_at, EXCLUDED.queued_at) END,
    started_at  = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.started_at
                       ELSE COALESCE(r.started_at, EXCLUDED.started_at) END,
    finished_at = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.finished_at
                       ELSE COALESCE(r.finished_at, EXCLUDED.finished_at) END,
    note        = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.note
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed') THEN r.note
                       ELSE COALESCE(EXCLUDED.note, r.note) END,
    replay      = GREATEST(r.replay, EXCLUDED.replay),
    updated_at  = now()
"""


@dataclass(slots=True)
class _Item:
    """One decoded message with what the batch will write for it."""

    msg: Msg
    data_rows: list[tuple[Any, ...]]
    run_row: dict[str, Any]
    span: Span | None = None
    #: A body in the object store, read before the write and deleted after the commit.
    body_ref: str | None = None
    #: The page whose rows are built once its body is in hand (``body_ref``).
    payload: RawPayload | None = None
    #: The source's state after this run (its last page only).
    state_row: dict[str, Any] | None = None
    #: The page stored whole from ``body_ref``'s temporary file (``body_file``).
    large_rows: list[_rows.LargeRow] = field(default_factory=list)
    body_file: io.BufferedIOBase | None = None

    def close(self) -> None:
        """Remove the body's temporary file, if any (idempotent)."""
        if self.body_file is not None:
            self.body_file.close()


def _state_row(event: RawPayload) -> dict[str, Any] | None:
    """What the run's last page tells the source's next run, if anything."""
    if not event.last or not (event.remember or event.cursor is not None):
        return None
    return {
        "source": event.source,
        "remember": event.remember,
        "etag": event.etag,
        "last_modified": event.last_modified,
        "body_sha256": event.body_sha256,
        "cursor": event.cursor,
    }


def _run_row(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(
        (
            "attempts",
            "pages",
            "rows",
            "bytes",
            "http_status",
            "error_code",
            "error",
            "trace_id",
            "queued_at",
            "started_at",
            "finished_at",
        )
    )
    row.update(attempts=0, pages=0, rows=0, bytes=0, replay=0, note=None)
    row.update(fields)
    return row


def _run_rows(items: Sequence[_Item]) -> list[dict[str, Any]]:
    """The run upserts of a batch: one per run for consecutive pages of the same attempt.

    A batch of 256 pages of one paginated run updated its record 256 times (measured: 8-9 ms
    beside 50-90 ms for the pages' rows, against 0.2 ms once); one merged row gives the same
    record, because pages only move it forward (``UPSERT_RUN``). Any other event of
    the run, or a page of another replay, ends the stretch: those are applied in their order.
    """
    rows: list[dict[str, Any]] = []
    #: Per run: where its current stretch of pages is merged.
    merging: dict[str, int] = {}
    for item in items:
        row = item.run_row
        at = merging.get(row["run_id"])
        if item.payload is None or at is None or rows[at]["replay"] != row["replay"]:
            if item.payload is None:
                merging.pop(row["run_id"], None)
            else:
                merging[row["run_id"]] = len(rows)
            rows.append(row)
            continue
        rows[at] = _then(rows[at], row)
    return rows


def _then(before: dict[str, Any], page: dict[str, Any]) -> dict[str, Any]:
    """One page row doing what ``before`` and then ``page`` do (same run, same replay)."""
    merged = dict(before)
    for counter in ("attempts", "pages", "rows", "bytes"):
        merged[counter] = max(before[counter], page[counter])
    for first_wins in ("trace_id", "finished_at"):
        merged[first_wins] = before[first_wins] or page[first_wins]
    if before["status"] != "stored":  # stored is terminal: what came with it stays
        merged["status"] = page["status"]
        merged["http_status"] = page["http_status"] or before["http_status"]
    return merged


def _item_for_command(msg: Msg) -> _Item:
    cmd = _decode_command(msg.data)
    run = _run_row(
        run_id=cmd.run_id,
        source=cmd.source,
        trigger=cmd.trigger,
        scheduled_for=cmd.scheduled_for,
        status="queued",
        trace_id=message_trace_id(msg.headers),
        queued_at=cmd.requested_at,
        replay=cmd.replay,
    )
    return _Item(msg, [], run)


def _item_for_event(msg: Msg) -> _Item:
    event = _decode_event(msg.data)
    common = {
        "run_id": event.run_id,
        "source": event.source,
        "trigger": event.trigger,
        "scheduled_for": event.scheduled_for,
        "attempts": event.attempt,
        "trace_id": message_trace_id(msg.headers),
        "replay": event.replay,
    }
    if isinstance(event, FetchStarted):
        return _Item(msg, [], _run_row(**common, status="fetching", started_at=event.started_at))
    if isinstance(event, RunMissed):
        run = _run_row(**common, status="missed", error=event.reason or None, error_code="missed")
        return _Item(msg, [], run)
    if isinstance(event, FetchUnchanged):
        run = _run_row(
            **common,
            status="unchanged",
            http_status=event.http_status,
            finished_at=event.finished_at,
            note=event.note or None,
        )
        return _Item(msg, [], run)
    if isinstance(event, FetchFailed):
        run = _run_row(
            **common,
            status="failed",
            http_status=event.http_status,
            error_code=event.error_code,
            error=event.error,
            finished_at=event.failed_at,
        )
        return _Item(msg, [], run)
    assert isinstance(event, RawPayload)
    run = _run_row(
        **common,
        status="stored" if event.last else "fetching",
        pages=event.page + 1,
        rows=event.run_rows if event.run_rows is not None else event.page + 1,
        bytes=event.run_bytes,
        http_status=event.status_code,
        finished_at=event.fetched_at if event.last else None,
    )
    rows = [] if event.body_ref is not None else _rows.data_rows(event, event.body)
    return _Item(
        msg, rows, run, body_ref=event.body_ref, payload=event, state_row=_state_row(event)
    )


class Writer:
    """Persists commands (as queued runs) and run events (as rows and run outcomes)."""

    def __init__(self, bus: Bus, db: Database, *, batch_size: int) -> None:
        self._bus = bus
        self._db = db
        self._batch_size = batch_size
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self.rows_written = 0
        self.batches = 0

    def stop_intake(self) -> None:
        """Finish the fetch and the batch in hand, then take no more.

        The fetch in progress is not cancelled: a cancelled pull request stays open on the
        server until it expires, and a message delivered to it would wait out ``ack_wait``.
        """
        self._stopping.set()

    async def drain(self) -> None:
        """Wait until both consumers have written their last batch and let go."""
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self._bus.subjects
        runs = await self._bus.pull(s.collect_stream, s.runs_consumer)
        raw = await self._bus.pull(s.raw_stream, s.writer_consumer)
        try:
            async with anyio.create_task_group() as tg:
                # The fetcher's copy of source_state may be behind (a copy failed, new bucket).
                tg.start_soon(self.publish_source_states, name="writer-source-state")
                tg.start_soon(
                    self._consume, runs, _item_for_command, s.runs_consumer, name="writer-runs"
                )
                tg.start_soon(
                    self._consume, raw, _item_for_event, s.writer_consumer, name="writer-raw"
                )
                task_status.started()
            await self._bus.unsubscribe(runs)
            await self._bus.unsubscribe(raw)
            self._stopped.set()
            await anyio.sleep_forever()
        finally:
            await self._bus.unsubscribe(runs)
            await self._bus.unsubscribe(raw)

    async def _consume(
        self, sub: PullSubscription, build: Callable[[Msg], _Item], consumer: str
    ) -> None:
        # Batches are bounded in bytes too: 256 pages of almost 1 MiB would hold 256 MiB.
        # The next batch asks for as many messages as the last ones' size fits in the budget,
        # starting as if every message were as large as NATS allows.
        want = self._batch_limit(self._bus.max_payload)
        while not self._stopping.is_set():
            msgs = await self._bus.fetch(sub, want, _FETCH_WAIT_S)
            if msgs:
                want = self._batch_limit(sum(len(msg.data) for msg in msgs) // len(msgs))
                await self._write_batch(msgs, build, consumer)

    def _batch_limit(self, message_bytes: int) -> int:
        return max(1, min(self._batch_size, BATCH_BYTES // max(1, message_bytes)))

    async def _write_batch(
        self, msgs: Sequence[Msg], build: Callable[[Msg], _Item], consumer: str
    ) -> None:
        items: list[_Item] = []
        for msg in msgs:
            try:
                items.append(build(msg))
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                # Poison: retrying cannot make it valid. (UnicodeError is a ValueError.)
                log.error("write.poison", extra={"subject": msg.subject, "error": str(exc)})
                await self._dead_letter(msg, None, None, "poison", str(exc))
                await _settle(msg.term)
        if not items:
            return
        try:
            await self._write_items(items, consumer)
        finally:
            for item in items:
                item.close()

    async def _write_items(self, items: Sequence[_Item], consumer: str) -> None:
        try:
            await self._resolve_bodies(items)
        except TransientError as exc:
            log.warning("write.body_unavailable", extra={"error": str(exc)})
            for item in items:
                await _settle(partial(item.msg.nak, delay=_STORE_RETRY_S))
            return
        started = anyio.current_time()
        outcome: _metrics.BatchOutcome = "committed"
        with _tracing.batch_span(
            f"write {consumer}", (item.msg.headers for item in items)
        ) as batch:
            batch.set_attribute(_tracing.CONSUMER_GROUP, consumer)
            batch.set_attribute(_tracing.OPERATION_TYPE, "process")
            batch.set_attribute("db.system.name", "postgresql")
            for item in items:
                item.span = _message_span(item, consumer)
            try:
                await self._store(items)
            except StoreUnavailable as exc:
                log.warning("write.store_unavailable", extra={"error": str(exc)})
                _end_spans(items, error=str(exc))
                for item in items:
                    await _settle(partial(item.msg.nak, delay=_STORE_RETRY_S))
                _metrics.record_batch(
                    consumer,
                    size=len(items),
                    duration_s=anyio.current_time() - started,
                    outcome="store_unavailable",
                )
                await anyio.sleep(_STORE_RETRY_S)
                return
            except psycopg.Error as exc:
                log.warning("write.batch_rejected", extra={"error": str(exc), "size": len(items)})
                outcome = "split"
                await self._store_one_by_one(items)
            else:
                _end_spans(items)
                for item in items:
                    await _settle(item.msg.ack)
                await self._forget_bodies(items)
        self.batches += 1
        _metrics.record_batch(
            consumer, size=len(items), duration_s=anyio.current_time() - started, outcome=outcome
        )

    async def _resolve_bodies(self, items: Sequence[_Item]) -> None:
        """Read bodies that travelled through the object store, each into a temporary file as
        its chunks arrive, and build their rows (``_rows.rows_of_file``)."""
        for item in items:
            if item.body_ref is None or item.payload is None:
                continue
            item.body_file = await anyio.to_thread.run_sync(_rows.body_file)
            await self._bus.get_body(item.body_ref, item.body_file)
            item.data_rows, item.large_rows = await anyio.to_thread.run_sync(
                _rows.rows_of_file, item.payload, item.body_file
            )

    async def _forget_bodies(self, items: Sequence[_Item]) -> None:
        for item in items:
            if item.body_ref is not None:
                await self._bus.delete_body(item.body_ref)

    async def _store(self, items: Sequence[_Item]) -> None:
        rows = [row for item in items for row in item.data_rows]
        large = [row for item in items for row in item.large_rows]
        states = [item.state_row for item in items if item.state_row is not None]
        try:
            # Pipelined (not with COPY, which a pipeline cannot carry): BEGIN, the statements
            # and COMMIT go out together and the batch waits for PostgreSQL once, at the commit;
            # an error still rolls the whole transaction back.
            async with (
                self._db.pool.connection() as conn,
                nullcontext() if large else conn.pipeline(),
                conn.transaction(),
                conn.cursor() as cur,
            ):
                if rows:
                    with _sql_span(conn, self._db.schema, "collected_data", len(rows)):
                        await cur.executemany(_rows.INSERT_DATA, rows)
                if large:
                    with _sql_span(conn, self._db.schema, "collected_data", len(large)):
                        await _rows.copy_large(cur, large)
                runs = _run_rows(items)
                with _sql_span(conn, self._db.schema, "collection_runs", len(runs)):
                    await cur.executemany(UPSERT_RUN, runs)
                if states:
                    with _sql_span(conn, self._db.schema, "source_state", len(states)):
                        await cur.executemany(UPSERT_SOURCE_STATE, states)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(str(exc).strip() or type(exc).__name__) from exc
        self.rows_written += len(rows) + len(large)
        _record_committed(items)
        if states:
            await self.publish_source_states(sorted({state["source"] for state in states}))

    async def publish_source_states(self, sources: Sequence[str] | None = None) -> None:
        """Copy ``source_state`` rows (all, or these sources') into ``<prefix>_sources``.

        Failing is logged, never raised: the data is committed, and the next commit or start-up
        copies the row again.
        """
        try:
            async with self._db.pool.connection() as conn, conn.cursor() as cur:
                await cur.execute(
                    SELECT_SOURCE_STATE, {"sources": list(sources) if sources else None}
                )
                found = await cur.fetchall()
            for source, etag, last_modified, body_sha256, cursor in found:
                value = {
                    "etag": etag,
                    "last_modified": last_modified,
                    "body_sha256": body_sha256,
                    "cursor": cursor,
                }
                await self._bus.kv_put(self._bus.sources, source, msgspec.json.encode(value))
        except (psycopg.Error, StoreUnavailable, TransientError) as exc:
            log.warning("write.source_state_unpublished", extra={"error": str(exc)})

    async def _store_one_by_one(self, items: Sequence[_Item]) -> None:
        for item in items:
            try:
                try:
                    await self._store([item])
                except psycopg.errors.NumericValueOutOfRange:
                    # Valid JSON with a number jsonb cannot hold (1e999999): stored as
                    # received in ``body`` instead, like any JSON jsonb refuses.
                    if not _rows.to_body(item.data_rows, item.large_rows):
                        raise
                    await self._store([item])
            except StoreUnavailable:
                _end_spans([item], error="store unavailable")
                await _settle(partial(item.msg.nak, delay=_STORE_RETRY_S))
                continue
            except psycopg.Error as exc:
                await self._reject(item, exc)
                continue
            _end_spans([item])
            await _settle(item.msg.ack)

    async def _reject(self, item: _Item, exc: psycopg.Error) -> None:
        """PostgreSQL refuses this message's row: record the run as failed, say why."""
        reason = f"PostgreSQL rejected the row: {str(exc).strip()}"
        run = item.run_row | {
            "status": "failed",
            "error_code": "store_rejected",
            "error": reason,
            "finished_at": datetime.now(UTC),
        }
        log.error(
            "write.rejected",
            extra={"source": run["source"], "run_id": run["run_id"], "error": reason},
        )
        try:
            async with self._db.pool.connection() as conn:
                with _sql_span(conn, self._db.schema, "collection_runs", 1):
                    await conn.execute(UPSERT_RUN, run)
        except psycopg.Error as second:
            log.error("write.reject_failed", extra={"run_id": run["run_id"], "error": str(second)})
            _end_spans([item], error=str(second))
            await _settle(partial(item.msg.nak, delay=_STORE_RETRY_S))
            return
        _end_spans([item], error=reason)
        _metrics.record_run(
            run["source"], "failed", trigger=run["trigger"], error_type="store_rejected"
        )
        await self._dead_letter(item.msg, run["source"], run["run_id"], "store_rejected", reason)
        await _settle(item.msg.term)

    async def _dead_letter(
        self, msg: Msg, source: str | None, run_id: str | None, code: str, error: str
    ) -> None:
        try:
            await self._bus.dead_letter(
                msg,
                source=source or msg.subject.split(".")[2],
                run_id=run_id,
                code=code,
                error=error,
            )
        except TransientError as exc:
            log.error("write.dead_letter_failed", extra={"run_id": run_id, "error": str(exc)})
        else:
            _metrics.record_dead_letter(source or msg.subject.split(".")[2], code, stage="writer")


def _message_span(item: _Item, consumer: str) -> Span:
    """A per-message span in the run's own trace, so the write shows up in it."""
    run = item.run_row
    return _tracing.tracer().start_span(
        f"process {item.msg.subject}",
        context=_tracing.extract(item.msg.headers),
        kind=SpanKind.CONSUMER,
        attributes={
            _tracing.SYSTEM: _tracing.MESSAGING_SYSTEM,
            _tracing.OPERATION_TYPE: "process",
            _tracing.OPERATION_NAME: "write",
            _tracing.DESTINATION: item.msg.subject,
            _tracing.CONSUMER_GROUP: consumer,
            _tracing.BODY_SIZE: len(item.msg.data),
            _tracing.COLETA_SOURCE: str(run["source"]),
            _tracing.COLETA_RUN_ID: str(run["run_id"]),
            "coleta.run_status": str(run["status"]),
        },
        links=[trace.Link(trace.get_current_span().get_span_context())],
    )


def _sql_span(
    conn: psycopg.AsyncConnection[Any], schema: str, table: str, count: int
) -> AbstractContextManager[Span]:
    """The CLIENT span of one statement (``executemany`` of ``count`` parameter sets)."""
    info = conn.info  # read from libpq: no round trip
    return _tracing.db_span(
        "INSERT",
        table,
        batch_size=count,
        namespace=f"{info.dbname}.{schema}",
        server_address=info.host,
        server_port=info.port,
    )


def _record_committed(items: Sequence[_Item]) -> None:
    """Count what a committed transaction holds: rows per source and finished runs."""
    rows: dict[str, int] = {}
    for item in items:
        run = item.run_row
        if count := len(item.data_rows) + len(item.large_rows):
            rows[run["source"]] = rows.get(run["source"], 0) + count
        if run["status"] in ("stored", "unchanged", "failed", "missed"):
            _metrics.record_run(
                run["source"],
                run["status"],
                trigger=run["trigger"],
                error_type=run["error_code"] if run["status"] == "failed" else None,
            )
    for source, count in rows.items():
        _metrics.record_rows(source, count)


def _end_spans(items: Sequence[_Item], *, error: str | None = None) -> None:
    for item in items:
        if item.span is None:
            continue
        if error is not None:
            item.span.set_status(trace.Status(trace.StatusCode.ERROR, _tracing.redact_text(error)))
        item.span.end()
        item.span = None


async def _settle(action: Callable[[], Awaitable[Any]]) -> None:
    """Ack/nak/term, shielded: a settle cut short by shutdown would only cause a replay."""
    with anyio.CancelScope(shield=True):
        try:
            await action()
        except (nats.errors.Error, OSError) as exc:
            log.warning("write.settle_failed", extra={"error": str(exc) or type(exc).__name__})
