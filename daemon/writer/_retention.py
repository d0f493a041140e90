"""Retention: prune collected rows and runs older than each source's ``retention_days``.

A named task beside the writer (only where the writer role runs): once at start-up, then every
``PRUNE_EVERY_S``. It deletes in small batches — ``BATCH_ROWS`` rows per statement, each its
own transaction, with a pause between — so it never holds long locks nor bloats one
transaction, and it is idempotent: two replicas pruning at once just find less to delete.
Rows are judged by ``collected_at`` (``collected_data``) and ``created_at``
(``collection_runs``); a pending row (not yet claimed downstream) is pruned like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import anyio

from daemon.errors import classify
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.settings import SourceConfig

__all__ = ["BATCH_ROWS", "PRUNE_EVERY_S", "prune", "prune_forever"]

log = get_logger("retention")

BATCH_ROWS = 1000
#: Pause between two batches, so pruning yields to the writer.
PAUSE_S = 0.05
PRUNE_EVERY_S = 3600.0

_PRUNE_DATA = """
DELETE FROM collected_data WHERE id IN (
    SELECT id FROM collected_data WHERE source = %(source)s AND collected_at < %(cutoff)s
    LIMIT %(batch)s
)
"""
_PRUNE_RUNS = """
DELETE FROM collection_runs WHERE run_id IN (
    SELECT run_id FROM collection_runs WHERE source = %(source)s AND created_at < %(cutoff)s
    LIMIT %(batch)s
)
"""


async def _prune_table(
    db: Database, sql: str, source: str, cutoff: datetime, batch: int, pause_s: float
) -> int:
    """Delete in batches of ``batch`` rows, one transaction each, until a batch comes short."""
    params = {"source": source, "cutoff": cutoff, "batch": batch}
    total = 0
    while True:
        async with db.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            deleted = cur.rowcount
        total += deleted
        if deleted < batch:
            return total
        await anyio.sleep(pause_s)


async def prune(
    db: Database,
    sources: Sequence[SourceConfig],
    now: datetime,
    *,
    batch: int = BATCH_ROWS,
    pause_s: float = PAUSE_S,
) -> dict[str, tuple[int, int]]:
    """Delete what is past retention; per source pruned, (data rows, runs) deleted."""
    pruned: dict[str, tuple[int, int]] = {}
    for source in sources:
        if source.retention_days is None:
            continue
        cutoff = now - timedelta(days=source.retention_days)
        rows = await _prune_table(db, _PRUNE_DATA, source.name, cutoff, batch, pause_s)
        runs = await _prune_table(db, _PRUNE_RUNS, source.name, cutoff, batch, pause_s)
        if rows or runs:
            pruned[source.name] = (rows, runs)
            log.info(
                "retention.pruned",
                extra={
                    "source": source.name,
                    "rows": rows,
                    "runs": runs,
                    "cutoff": cutoff.isoformat(),
                },
            )
    return pruned


async def prune_forever(
    db: Database,
    sources: Callable[[], Sequence[SourceConfig]],
    now: Callable[[], datetime],
    *,
    every_s: float = PRUNE_EVERY_S,
) -> None:
    """Prune now and then every ``every_s``; ``sources()`` is read each time (SIGHUP)."""
    while True:
        try:
            await prune(db, sources(), now())
        except Exception as exc:  # never stops the writer: the next pass tries again
            log.warning("retention.failed", extra={"error": str(classify(exc))})
        await anyio.sleep(every_s)
