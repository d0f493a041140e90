"""The writer's transactions, and holding them while PostgreSQL cannot take them.

A transaction holds a group of items' rows, their runs' records and their sources' state
(``store``). While PostgreSQL is unavailable (``StoreUnavailable``) the group is held — its
messages kept alive by ``_batch.Batch.keep_alive`` — and tried again with capped backoff
(``until_answered``): a nak would spend a delivery every time. PostgreSQL answering "not now"
(a statement timeout, a deadlock, a lock not available) is retried too, but not forever: the
statement itself may be what it cannot do, so past a few refusals in a row it counts as
refusing the data (``StoreRejected``). Stopping meanwhile raises ``HandBack``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import anyio

from contracts import SourceState
from daemon.errors import ColetaError, StoreRejected, StoreUnavailable, classify, psycopg_errors
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.platform.retry import Backoff, Retrying, retry
from daemon.writer._batch import HandBack, Item
from daemon.writer._rows import copy_large
from daemon.writer._runs import RunRow, run_rows
from daemon.writer._sql import INSERT_DATA, SELECT_SOURCE_STATE, UPSERT_RUN, UPSERT_SOURCE_STATE

__all__ = ["Failed", "Store"]

log = get_logger("writer")

#: While PostgreSQL is unavailable a held group is tried again after 0.5 s, doubling to 4 s.
_HOLD = Backoff(first_s=0.5, cap_s=4.0)
#: SQLSTATEs with which PostgreSQL refuses a statement for now, while it is up: retried, then
#: treated as a refusal of the data so a batch it never takes is not held forever.
_REFUSED_FOR_NOW = ("40", "55P03", "57014")
_REFUSALS_BEFORE_REJECTING = 6


@dataclass(frozen=True, slots=True)
class Failed:
    """Why a write failed: the classified error and the exception raised."""

    error: ColetaError
    cause: BaseException


class Store:
    """Writes the writer's transactions; gives up holding one when ``stopping`` is set."""

    def __init__(self, db: Database, stopping: anyio.Event) -> None:
        self._db = db
        self._stopping = stopping

    async def write(self, items: Sequence[Item]) -> None:
        """One transaction: the items' rows, their runs' records, their sources' state."""
        rows = [row for item in items for row in item.data_rows]
        large = [row for item in items for row in item.large_rows]
        states = [item.state_row.params() for item in items if item.state_row is not None]
        db = self._db
        # Pipelined (not with COPY, which a pipeline cannot carry): BEGIN, the statements
        # and COMMIT go out together and the batch waits for PostgreSQL once, at the commit;
        # an error still rolls the whole transaction back.
        async with (
            db.pool.connection() as conn,
            nullcontext() if large else conn.pipeline(),
            conn.transaction(),
            conn.cursor() as cur,
        ):
            if rows:
                with db.statement_span(conn, "collected_data", len(rows)):
                    await cur.executemany(INSERT_DATA, rows)
            if large:
                with db.statement_span(conn, "collected_data", len(large)):
                    await copy_large(cur, large)
            runs = run_rows((item.run_row, item.payload is not None) for item in items)
            with db.statement_span(conn, "collection_runs", len(runs)):
                await cur.executemany(UPSERT_RUN, [run.params() for run in runs])
            if states:
                # After the runs: a run recorded failed keeps its source's state as it was.
                with db.statement_span(conn, "source_state", len(states)):
                    await cur.executemany(UPSERT_SOURCE_STATE, states)

    async def record_run(self, run: RunRow) -> None:
        """A run's record alone (a run whose message is rejected)."""
        async with self._db.pool.connection() as conn:
            with self._db.statement_span(conn, "collection_runs", 1):
                await conn.execute(UPSERT_RUN, run.params())

    async def source_states(self, sources: Sequence[str] | None) -> list[tuple[str, SourceState]]:
        """``source_state`` rows (all, or these sources'), as the fetcher reads them."""
        with psycopg_errors():
            async with self._db.pool.connection() as conn, conn.cursor() as cur:
                await cur.execute(
                    SELECT_SOURCE_STATE, {"sources": list(sources) if sources else None}
                )
                found = await cur.fetchall()
        return [
            (source, SourceState(etag=etag, last_modified=modified, body_sha256=sha, cursor=cursor))
            for source, etag, modified, sha, cursor in found
        ]

    async def until_answered(
        self, action: Callable[[], Awaitable[None]], size: int
    ) -> Failed | None:
        """Run ``action`` until PostgreSQL answers: None once it succeeded, else why it failed
        (never ``StoreUnavailable``). Stopping while holding raises ``HandBack``."""
        holding = False
        refusals = 0

        def may_pass(exc: BaseException) -> bool:
            nonlocal refusals
            if isinstance(exc, HandBack) or not isinstance(classify(exc), StoreUnavailable):
                return False
            if _refused_for_now(exc):
                refusals += 1
                return refusals < _REFUSALS_BEFORE_REJECTING
            return True

        def hold(failed: Retrying) -> None:
            nonlocal holding
            if not holding:
                error = str(classify(failed.error))
                log.warning("write.store_unavailable", extra={"error": error, "size": size})
                holding = True

        async def attempt() -> None:
            await (self._unless_stopping(action) if holding else action())

        async def wait(delay_s: float) -> None:
            with anyio.move_on_after(delay_s):
                await self._stopping.wait()
            if self._stopping.is_set():
                raise HandBack

        try:
            await retry(attempt, retry_on=may_pass, backoff=_HOLD, on_retry=hold, wait=wait)
        except HandBack:
            raise
        except Exception as exc:
            found = classify(exc)
            if isinstance(found, StoreUnavailable):  # refused for now, too many times in a row
                found = StoreRejected(
                    f"{found} ({refusals} times in a row)", sqlstate=_sqlstate(exc)
                )
            if holding:
                log.info("write.store_back")
            return Failed(found, exc)
        if holding:
            log.info("write.store_back")
        return None

    async def _unless_stopping(self, action: Callable[[], Awaitable[None]]) -> None:
        """``action``, given up (``HandBack``) if the writer is asked to stop meanwhile."""
        done = False
        failed: list[Exception] = []
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await self._stopping.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch, name="writer-stop-watch")
            try:
                await action()
            except Exception as exc:
                failed.append(exc)
            done = True
            tg.cancel_scope.cancel()
        if failed:
            raise failed[0]
        if not done:
            raise HandBack


def _sqlstate(exc: BaseException) -> str | None:
    sqlstate = getattr(exc, "sqlstate", None)
    return sqlstate if isinstance(sqlstate, str) else None


def _refused_for_now(exc: BaseException) -> bool:
    return (_sqlstate(exc) or "").startswith(_REFUSED_FOR_NOW)
