"""Retention: rows and runs older than a source's retention_days go, in small batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from daemon.app import open_daemon
from daemon.platform.db import Database
from daemon.writer import prune
from tests.fix_daemon import MakeSettings, wait_for

pytestmark = pytest.mark.anyio

NOW = datetime.now(UTC)


def add_history(conn: psycopg.Connection[TupleRow], source: str, age: timedelta, n: int) -> None:
    when = NOW - age
    conn.execute(
        "INSERT INTO collected_data (run_id, source, page, collected_at, data)"
        " SELECT %(source)s || '@' || %(tag)s, %(source)s, i, %(when)s, '{}'::jsonb"
        " FROM generate_series(1, %(n)s) AS i",
        {"source": source, "tag": str(age), "when": when, "n": n},
    )
    conn.execute(
        "INSERT INTO collection_runs (run_id, source, trigger, scheduled_for, status, created_at)"
        " VALUES (%(source)s || '@' || %(tag)s, %(source)s, 'schedule', %(when)s, 'stored',"
        " %(when)s)",
        {"source": source, "tag": str(age), "when": when},
    )


def counts(conn: psycopg.Connection[TupleRow], source: str) -> tuple[int, int]:
    data = conn.execute("SELECT count(*) FROM collected_data WHERE source = %s", (source,))
    runs = conn.execute("SELECT count(*) FROM collection_runs WHERE source = %s", (source,))
    return (data.fetchone() or (0,))[0], (runs.fetchone() or (0,))[0]


SOURCES: list[dict[str, Any]] = [
    {"name": "short", "url": "http://127.0.0.1:9/", "schedule": "0 0 1 1 *", "retention_days": 2},
    {"name": "forever", "url": "http://127.0.0.1:9/", "schedule": "0 0 1 1 *"},
]


async def test_prune_deletes_only_what_is_past_retention_in_batches(
    make_settings: MakeSettings, db_conn: psycopg.Connection[TupleRow]
) -> None:
    settings = make_settings(sources=SOURCES)
    async with Database.open(settings.database_url or "", settings.database_schema) as db:
        add_history(db_conn, "short", timedelta(days=3), 2500)
        add_history(db_conn, "short", timedelta(days=5), 10)
        add_history(db_conn, "short", timedelta(days=1), 7)
        add_history(db_conn, "forever", timedelta(days=400), 5)

        pruned = await prune(db, settings.sources, NOW, batch=1000, pause_s=0)
        assert pruned == {"short": (2510, 2)}
        assert counts(db_conn, "short") == (7, 1)
        assert counts(db_conn, "forever") == (5, 1)
        # Idempotent: nothing more to do.
        assert await prune(db, settings.sources, NOW, batch=1000, pause_s=0) == {}


async def test_the_daemon_prunes_at_start_where_the_writer_runs(
    make_settings: MakeSettings, db_conn: psycopg.Connection[TupleRow]
) -> None:
    settings = make_settings(sources=SOURCES)
    async with open_daemon(settings, roles=["service"]):
        pass  # migrations applied, no writer role: no pruning
    add_history(db_conn, "short", timedelta(days=30), 3)
    async with open_daemon(settings, roles=["ticker", "service"]):
        assert counts(db_conn, "short") == (3, 1)
    async with open_daemon(settings):
        await wait_for(lambda: counts(db_conn, "short") == (0, 0), what="pruning")
