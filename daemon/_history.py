"""Reads of run history for the service: recent runs and per-source summaries.

Replies are built from PostgreSQL, not from process memory, so every replica answers the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from psycopg.rows import dict_row

from contracts import RunInfo
from daemon._db import Database

__all__ = ["SourceSummary", "recent_runs", "source_summaries"]

_RUN_COLUMNS = """run_id, source, trigger, scheduled_for, status, attempts, pages, rows, bytes,
    http_status, error, trace_id, queued_at, started_at, finished_at"""

RECENT_RUNS = f"""
SELECT {_RUN_COLUMNS} FROM collection_runs
WHERE %(source)s::text IS NULL OR source = %(source)s
ORDER BY created_at DESC, run_id DESC
LIMIT %(limit)s
"""

SOURCE_SUMMARIES = f"""
SELECT s.name AS summary_source, totals.rows AS total_rows, fails.n AS consecutive_failures, last.*
FROM unnest(%(names)s::text[]) AS s(name)
LEFT JOIN LATERAL (
    SELECT {_RUN_COLUMNS} FROM collection_runs r
    WHERE r.source = s.name ORDER BY r.created_at DESC, r.run_id DESC LIMIT 1
) last ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS n FROM collection_runs r
    WHERE r.source = s.name AND r.status = 'failed'
      AND r.created_at > COALESCE(
          (SELECT max(ok.created_at) FROM collection_runs ok
           WHERE ok.source = s.name AND ok.status = 'stored'), '-infinity')
) fails ON true
LEFT JOIN LATERAL (
    SELECT COALESCE(sum(r.rows), 0) AS rows FROM collection_runs r WHERE r.source = s.name
) totals ON true
"""


class SourceSummary(msgspec.Struct, frozen=True, kw_only=True):
    last_run: RunInfo | None
    consecutive_failures: int
    rows: int


def _run(row: dict[str, Any]) -> RunInfo:
    return msgspec.convert(row, RunInfo, from_attributes=False)


async def recent_runs(db: Database, *, source: str | None, limit: int) -> list[RunInfo]:
    async with db.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(RECENT_RUNS, {"source": source, "limit": limit})
        return [_run(row) for row in await cur.fetchall()]


async def source_summaries(db: Database, names: Sequence[str]) -> dict[str, SourceSummary]:
    async with db.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(SOURCE_SUMMARIES, {"names": list(names)})
        out: dict[str, SourceSummary] = {}
        for row in await cur.fetchall():
            name = row.pop("summary_source")
            total = int(row.pop("total_rows"))
            failures = int(row.pop("consecutive_failures"))
            last = _run(row) if row["run_id"] is not None else None
            out[name] = SourceSummary(last_run=last, consecutive_failures=failures, rows=total)
        return out
