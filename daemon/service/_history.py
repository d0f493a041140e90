"""Reads of run history for the service: recent runs and per-source summaries.

Replies are built from PostgreSQL, not from process memory, so every replica answers the same.
Error and note texts are cut to ``REPLY_TEXT_LIMIT`` characters here, so no reply built from
a run grows with what an API or a library once said.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any, get_args

import msgspec
from psycopg.rows import dict_row

from contracts import REPLY_TEXT_LIMIT, STRIP_DAYS, DayMark, DayOutcome, RunInfo
from daemon.platform.db import Database

__all__ = [
    "RunHistory",
    "SourceSummary",
    "bounded_text",
    "daily_outcomes",
    "recent_runs",
    "run_histories",
    "source_summaries",
]

_RUN_COLUMNS = """run_id, source, trigger, scheduled_for, status, attempts, pages, rows, bytes,
    http_status, error, trace_id, queued_at, started_at, finished_at, note"""

#: Newest first; with ``after``, the runs older than that run (keyset: its page ended there).
RECENT_RUNS = f"""
SELECT {_RUN_COLUMNS} FROM collection_runs
WHERE (%(source)s::text IS NULL OR source = %(source)s)
  AND (%(after)s::text IS NULL OR (created_at, run_id) < (
      SELECT created_at, run_id FROM collection_runs WHERE run_id = %(after)s))
ORDER BY created_at DESC, run_id DESC
LIMIT %(limit)s
"""

RUN_EXISTS = "SELECT 1 FROM collection_runs WHERE run_id = %(run_id)s"

# Per source ``s.name``: its newest stored run (stored or unchanged: the API answered and
# what it said is kept) and when that run finished; its first recorded run; and its failed
# runs since that stored run. Each is an index scan on (source, created_at).
_FRESHNESS_JOINS = """
LEFT JOIN LATERAL (
    SELECT ok.created_at, COALESCE(ok.finished_at, ok.updated_at) AS stored_at
    FROM collection_runs ok
    WHERE ok.source = s.name AND ok.status IN ('stored', 'unchanged')
    ORDER BY ok.created_at DESC LIMIT 1
) stored ON true
LEFT JOIN LATERAL (
    SELECT earliest.created_at AS first_run_at FROM collection_runs earliest
    WHERE earliest.source = s.name ORDER BY earliest.created_at LIMIT 1
) earliest ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS n FROM collection_runs r
    WHERE r.source = s.name AND r.status = 'failed'
      AND r.created_at > COALESCE(stored.created_at, '-infinity')
) fails ON true
"""

SOURCE_SUMMARIES = f"""
SELECT s.name AS summary_source, totals.rows AS total_rows, fails.n AS consecutive_failures,
       stored.stored_at AS summary_stored_at, earliest.first_run_at AS summary_first_run_at, last.*
FROM unnest(%(names)s::text[]) AS s(name)
LEFT JOIN LATERAL (
    SELECT {_RUN_COLUMNS} FROM collection_runs r
    WHERE r.source = s.name ORDER BY r.created_at DESC, r.run_id DESC LIMIT 1
) last ON true
{_FRESHNESS_JOINS}
LEFT JOIN LATERAL (
    SELECT COALESCE(sum(r.rows), 0) AS rows FROM collection_runs r WHERE r.source = s.name
) totals ON true
"""

#: What freshness needs of every source, in one query (health, the freshness gauges).
SOURCE_FRESHNESS = f"""
SELECT s.name, stored.stored_at, earliest.first_run_at, fails.n
FROM unnest(%(names)s::text[]) AS s(name)
{_FRESHNESS_JOINS}
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


class RunHistory(msgspec.Struct, frozen=True, kw_only=True):
    """What a source's freshness is judged on (``service._freshness``)."""

    #: When its newest stored (or unchanged) run finished; None: it never stored one.
    stored_at: datetime | None = None
    #: When its first recorded run was created; None: no run recorded.
    first_run_at: datetime | None = None
    #: Failed runs since that stored run (or ever).
    consecutive_failures: int = 0


class SourceSummary(msgspec.Struct, frozen=True, kw_only=True):
    last_run: RunInfo | None
    consecutive_failures: int
    rows: int
    history: RunHistory


def bounded_text(text: str | None, limit: int = REPLY_TEXT_LIMIT) -> str | None:
    """``text``, or its first ``limit`` characters and how long it was."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}… [truncated: {len(text):,} characters in all]"


def _run(row: dict[str, Any]) -> RunInfo:
    row["error"] = bounded_text(row["error"])
    row["note"] = bounded_text(row["note"])
    return msgspec.convert(row, RunInfo, from_attributes=False)


async def recent_runs(
    db: Database, *, source: str | None, limit: int, after: str | None = None
) -> list[RunInfo]:
    """Newest first; LookupError when the run ``after`` names is not recorded (pruned)."""
    async with db.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        if after is not None:
            await cur.execute(RUN_EXISTS, {"run_id": after})
            if await cur.fetchone() is None:
                raise LookupError(after)
        await cur.execute(RECENT_RUNS, {"source": source, "limit": limit, "after": after})
        return [_run(row) for row in await cur.fetchall()]


async def source_summaries(db: Database, names: Sequence[str]) -> dict[str, SourceSummary]:
    async with db.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(SOURCE_SUMMARIES, {"names": list(names)})
        out: dict[str, SourceSummary] = {}
        for row in await cur.fetchall():
            name = row.pop("summary_source")
            total = int(row.pop("total_rows"))
            failures = int(row.pop("consecutive_failures"))
            history = RunHistory(
                stored_at=row.pop("summary_stored_at"),
                first_run_at=row.pop("summary_first_run_at"),
                consecutive_failures=failures,
            )
            last = _run(row) if row["run_id"] is not None else None
            out[name] = SourceSummary(
                last_run=last, consecutive_failures=failures, rows=total, history=history
            )
        return out


async def run_histories(db: Database, names: Sequence[str]) -> dict[str, RunHistory]:
    """Every named source's ``RunHistory``, in one query."""
    async with db.pool.connection() as conn, conn.cursor() as cur:
        await cur.execute(SOURCE_FRESHNESS, {"names": list(names)})
        return {
            name: RunHistory(
                stored_at=stored_at, first_run_at=first_run_at, consecutive_failures=int(fails)
            )
            for name, stored_at, first_run_at, fails in await cur.fetchall()
        }


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
