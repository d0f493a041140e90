"""Reads of run history for the service: recent runs and per-source summaries.

Replies are built from PostgreSQL, not from process memory, so every replica answers the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any, get_args

import msgspec
from psycopg.rows import dict_row

from contracts import DayMark, DayOutcome, RunInfo
from daemon._db import Database

__all__ = ["STRIP_DAYS", "SourceSummary", "daily_outcomes", "recent_runs", "source_summaries"]

#: Days shown by ``coleta status``'s strip, today (UTC) included.
STRIP_DAYS = 30

_RUN_COLUMNS = """run_id, source, trigger, scheduled_for, status, attempts, pages, rows, bytes,
    http_status, error, trace_id, queued_at, started_at, finished_at, note"""

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
           WHERE ok.source = s.name AND ok.status IN ('stored', 'unchanged')), '-infinity')
) fails ON true
LEFT JOIN LATERAL (
    SELECT COALESCE(sum(r.rows), 0) AS rows FROM collection_runs r WHERE r.source = s.name
) totals ON true
"""


#: Per source and UTC day of ``scheduled_for``: the best outcome, ranked as ``DayOutcome``.
DAILY_OUTCOMES = """
SELECT source, (scheduled_for AT TIME ZONE 'UTC')::date AS day,
       min(CASE
             WHEN status = 'stored' AND rows > 0 THEN 0
             WHEN status IN ('stored', 'unchanged') THEN 1
             WHEN status IN ('queued', 'fetching') THEN 2
             WHEN status = 'failed' THEN 3
             ELSE 4
           END) AS best
FROM collection_runs
WHERE source = ANY(%(names)s::text[])
  AND scheduled_for >= %(since)s::date AT TIME ZONE 'UTC'
  AND scheduled_for < (%(today)s::date + 1) AT TIME ZONE 'UTC'
GROUP BY 1, 2
ORDER BY 1, 2
"""

_OUTCOMES: tuple[DayOutcome, ...] = get_args(DayOutcome)


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


async def daily_outcomes(
    db: Database, names: Sequence[str], today: date
) -> dict[str, list[DayMark]]:
    """The best outcome of each of the last ``STRIP_DAYS`` UTC days, per source (one query)."""
    since = today - timedelta(days=STRIP_DAYS - 1)
    out: dict[str, list[DayMark]] = {name: [] for name in names}
    async with db.pool.connection() as conn, conn.cursor() as cur:
        await cur.execute(DAILY_OUTCOMES, {"names": list(names), "since": since, "today": today})
        for source, day, best in await cur.fetchall():
            out[source].append(DayMark(day=day, outcome=_OUTCOMES[best]))
    return out
