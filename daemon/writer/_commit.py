"""Writing a transaction's worth of messages: build their rows, store them, settle them.

What rows a page makes, and which column each goes to, is ``_rows``. A body too large for a
NATS message is read from the object store into a temporary file, checked, and streamed into
PostgreSQL with COPY (``_rows.copy_large``): it is never in memory more than once. Once its page
is committed, the body leaves the object store; a dead-lettered page's body stays there for a
replay.

PostgreSQL refusing a group (``StoreRejected``), or anything unclassified, has the group written
again one message per transaction, so one bad row cannot sink the others; the bad one's run is
marked ``failed`` with the reason (when its record can be written at all) and the message goes
to the dead-letter stream. A message is termed only once its dead letter is stored: while the
dead-letter stream refuses it, the office holds it on its own stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import anyio

from contracts import source_of
from daemon.errors import ColetaError, InternalError, StoreRejected, TransientError, classify
from daemon.platform import metrics, spans
from daemon.platform.bus import Bus, Msg
from daemon.platform.dead_letters import DeadLetters
from daemon.platform.logs import get_logger
from daemon.writer._batch import Batch, HandBack, Item
from daemon.writer._rows import body_file, data_rows, rows_of_file, to_body
from daemon.writer._runs import failed_run
from daemon.writer._source_states import SourceStates
from daemon.writer._store import Failed, Store

__all__ = ["RETRY_S", "Committer"]

log = get_logger("writer")

#: How soon a message handed back for a redelivery (a body unreadable for now, a dead letter
#: refused) is offered again.
RETRY_S = 2.0
#: SQLSTATE of a number jsonb cannot hold (``NumericValueOutOfRange``).
_NUMERIC_OUT_OF_RANGE = "22003"


class Committer:
    """Writes groups of a batch's items in transactions and settles each message."""

    def __init__(self, bus: Bus, store: Store, dead_letters: DeadLetters) -> None:
        self._bus = bus
        self._store = store
        self._dead = dead_letters
        #: The fetcher's copy of ``source_state``, made after each commit.
        self.source_states = SourceStates(bus, store)

    async def write(self, batch: Batch, items: list[Item], consumer: str) -> None:
        """Build the rows of a transaction's worth of messages (bodies read from the object
        store into temporary files), write them, and let go of the files."""
        try:
            ready = []
            for item in items:
                try:
                    await self._build_rows(item)
                except Exception as exc:
                    found = classify(exc)
                    if isinstance(found, TransientError):  # the object store, for now
                        log.warning(
                            "write.body_unavailable",
                            extra={"run_id": item.run_row.run_id, "error": str(found)},
                        )
                        await batch.nak(item.msg, RETRY_S)
                    else:
                        await self._reject(batch, item, found, exc)
                    continue
                ready.append(item)
            if ready:
                await self._write_items(batch, ready, consumer)
        finally:
            for item in items:
                item.close()

    async def _build_rows(self, item: Item) -> None:
        """A page's rows: from its body in the message, or read from the object store into a
        temporary file as its chunks arrive (``rows_of_file``)."""
        if item.payload is None:
            return
        if item.body_ref is None:
            item.data_rows = data_rows(item.payload, item.payload.body)
            return
        item.body_file = await anyio.to_thread.run_sync(body_file)
        await self._bus.get_body(item.body_ref, item.body_file)
        item.data_rows, item.large_rows = await anyio.to_thread.run_sync(
            rows_of_file, item.payload, item.body_file
        )

    async def _write_items(self, batch: Batch, items: Sequence[Item], consumer: str) -> None:
        started = anyio.current_time()
        outcome: metrics.BatchOutcome = "committed"
        with spans.write_span(consumer, (item.msg.headers for item in items)):
            for item in items:
                run = item.run_row
                if not item.traced:
                    continue
                item.span = spans.message_span(
                    item.msg.subject,
                    item.msg.headers,
                    consumer=consumer,
                    body_size=len(item.msg.data),
                    source=run.source,
                    run_id=run.run_id,
                    status=run.status,
                )
            try:
                found = await self._store.until_answered(
                    partial(self._store.write, items), len(items)
                )
                if found is None:
                    await self._committed(batch, items)
                elif isinstance(found.error, TransientError):
                    outcome = "store_unavailable"
                    log.warning("write.batch_retry", extra={"error": str(found.error)})
                    _end_spans(items, error=str(found.error))
                    for item in items:
                        await batch.nak(item.msg, RETRY_S)
                elif len(items) == 1:
                    await self._write_one(batch, items[0], found)
                else:
                    log.warning(
                        "write.batch_rejected",
                        extra={"error": str(found.error), "size": len(items)},
                    )
                    outcome = "split"
                    for item in items:
                        await self._write_one(batch, item)
            except HandBack:
                outcome = "store_unavailable"
                raise
            finally:
                _end_spans(items, error="not written")
                metrics.record_batch(
                    consumer,
                    size=len(items),
                    duration_s=anyio.current_time() - started,
                    outcome=outcome,
                )

    async def _write_one(self, batch: Batch, item: Item, found: Failed | None = None) -> None:
        """One message in its own transaction: stored, or rejected alone."""
        if found is None:
            found = await self._store.until_answered(partial(self._store.write, [item]), 1)
        if (
            found is not None
            and isinstance(found.error, StoreRejected)
            and found.error.sqlstate == _NUMERIC_OUT_OF_RANGE
            and to_body(item.data_rows, item.large_rows)
        ):
            # Valid JSON with a number jsonb cannot hold (1e999999): stored as received in
            # ``body`` instead, like any JSON jsonb refuses.
            found = await self._store.until_answered(partial(self._store.write, [item]), 1)
        if found is None:
            await self._committed(batch, [item])
        elif isinstance(found.error, TransientError):
            _end_spans([item], error=str(found.error))
            await batch.nak(item.msg, RETRY_S)
        else:
            await self._reject(batch, item, found.error, found.cause)

    async def _committed(self, batch: Batch, items: Sequence[Item]) -> None:
        """After the commit: ack, forget the bodies, count, tell the fetcher the new state."""
        _end_spans(items)
        for item in items:
            await batch.ack(item.msg)
        for item in items:
            if item.body_ref is not None:
                await self._bus.delete_body(item.body_ref)
        _record_committed(items)
        sources = {item.state_row.source for item in items if item.state_row is not None}
        if sources:
            await self.source_states.copy(sorted(sources))

    async def _reject(
        self, batch: Batch, item: Item, error: ColetaError, cause: BaseException
    ) -> None:
        """This message cannot be stored, ever: record its run as failed (if PostgreSQL takes
        even that), say why, and dead-letter it. Its body stays in the object store."""
        if isinstance(error, StoreRejected):
            reason = f"PostgreSQL rejected the row: {error}"
        else:
            reason = f"cannot store the message: {error}"
        run = failed_run(item.run_row, error.code, reason)
        with spans.in_trace_of(item.msg.headers, item.span):
            log.error(
                "write.rejected",
                extra={
                    "source": run.source,
                    "run_id": run.run_id,
                    "error_code": error.code,
                    "error": reason,
                },
                exc_info=cause if isinstance(error, InternalError) else None,
            )
        found = await self._store.until_answered(partial(self._store.record_run, run), 1)
        if found is not None and isinstance(found.error, TransientError):
            _end_spans([item], error=str(found.error))
            await batch.nak(item.msg, RETRY_S)
            return
        if found is not None:  # its record cannot be written either (the run id is the fault)
            log.error(
                "write.reject_unrecorded",
                extra={"source": run.source, "error": str(found.error)},
            )
        else:
            metrics.record_run(run.source, "failed", trigger=run.trigger, error_type=error.code)
        _end_spans([item], error=reason)
        await self.dead_letter(batch, item.msg, run.run_id, error.code, reason)

    async def dead_letter(
        self, batch: Batch, msg: Msg, run_id: str | None, code: str, error: str
    ) -> None:
        """Keep the message on the dead-letter stream, then term it. While the dead-letter
        stream refuses, the office holds the message on its own stream: never lost."""
        batch.release(msg)
        await self._dead.dispose(
            msg,
            source=source_of(msg.subject),
            run_id=run_id,
            code=code,
            error=error,
            stage="writer",
        )


def _record_committed(items: Sequence[Item]) -> None:
    """Count what a committed transaction holds: rows per source and finished runs."""
    rows: dict[str, int] = {}
    for item in items:
        run = item.run_row
        if count := len(item.data_rows) + len(item.large_rows):
            rows[run.source] = rows.get(run.source, 0) + count
        if run.status in ("stored", "unchanged", "failed", "missed"):
            metrics.record_run(
                run.source,
                run.status,
                trigger=run.trigger,
                error_type=run.error_code if run.status == "failed" else None,
            )
    for source, count in rows.items():
        metrics.record_rows(source, count)


def _end_spans(items: Sequence[Item], *, error: str | None = None) -> None:
    for item in items:
        if item.span is None:
            continue
        spans.end_span(item.span, error=error)
        item.span = None
