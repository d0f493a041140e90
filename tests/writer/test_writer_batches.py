"""A batch updates each run's record once per stretch of pages, with the same result as
updating it once per message: checked on real PostgreSQL against the one-by-one upserts."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from contracts import RawPayload, RunStatus
from daemon.platform.migrate import apply_migrations
from daemon.writer._runs import RunRow, run_row, run_rows
from daemon.writer._sql import UPSERT_RUN

pytestmark = pytest.mark.anyio

SLOT = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
RUNS = ("a@1", "b@1")

#: A message as a batch's run upserts see it: its run's record, and whether it is a page.
Item = tuple[RunRow, bool]


def _page(run_id: str, page: int, *, last: bool, attempt: int, replay: int = 0) -> Item:
    payload = RawPayload(
        run_id=run_id,
        source=run_id.split("@")[0],
        trigger="manual",
        scheduled_for=SLOT,
        attempt=attempt,
        replay=replay,
        page=page,
        last=last,
        fetched_at=SLOT + timedelta(seconds=page),
        url="http://127.0.0.1/x",
        status_code=200 + page % 2,
        headers={},
        content_type="application/json",
        body=b"{}",
    )
    row = run_row(
        run_id=run_id,
        source=payload.source,
        trigger="manual",
        scheduled_for=SLOT,
        attempts=attempt,
        trace_id=f"{attempt:032x}",
        replay=replay,
        status="stored" if last else "fetching",
        pages=page + 1,
        rows=(page + 1) * 10,
        bytes=(page + 1) * 100,
        http_status=payload.status_code,
        finished_at=payload.fetched_at if last else None,
    )
    return row, True


def _event(run_id: str, status: RunStatus, *, attempt: int, replay: int = 0) -> Item:
    fields: dict[str, Any] = {}
    if status == "fetching":
        fields["started_at"] = SLOT
    elif status == "failed":
        fields.update(error_code="http_status", error="HTTP 404", http_status=404)
        fields["finished_at"] = SLOT + timedelta(hours=1)
    row = run_row(
        run_id=run_id,
        source=run_id.split("@")[0],
        trigger="manual",
        scheduled_for=SLOT,
        attempts=attempt,
        trace_id=f"{attempt:032x}",
        replay=replay,
        status=status,
        **fields,
    )
    return row, False


def _batch(rng: random.Random) -> list[Item]:
    """Two runs' events interleaved: pages in order with retries that go back, a started
    event per attempt, sometimes a failure or a replay in the middle."""
    items: list[Item] = []
    for run_id in RUNS:
        attempt, page = 1, 0
        items.append(_event(run_id, "queued", attempt=0))
        items.append(_event(run_id, "fetching", attempt=attempt))
        for _ in range(rng.randint(5, 40)):
            roll = rng.random()
            if roll < 0.08:  # a retry: a new attempt starts a few pages back
                attempt += 1
                page = max(0, page - rng.randint(1, 5))
                items.append(_event(run_id, "fetching", attempt=attempt))
            elif roll < 0.1:
                items.append(_event(run_id, "failed", attempt=attempt))
            elif roll < 0.12:
                items.append(_page(run_id, page, last=False, attempt=1, replay=1))
            items.append(_page(run_id, page, last=rng.random() < 0.05, attempt=attempt))
            page += 1
    # Interleave the two runs, keeping each run's own order.
    first = [i for i in items if i[0].run_id == RUNS[0]]
    second = [i for i in items if i[0].run_id == RUNS[1]]
    merged: list[Item] = []
    while first or second:
        take = first if first and (not second or rng.random() < 0.5) else second
        merged.append(take.pop(0))
    return merged


async def _records(url: str, schema: str, rows: list[RunRow]) -> list[tuple[Any, ...]]:
    """The run records after applying ``rows`` with ``UPSERT_RUN`` in a fresh schema."""
    name = sql.Identifier(schema)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await apply_migrations(conn, schema)
        try:
            await conn.execute(sql.SQL("SET search_path TO {}").format(name))
            async with conn.cursor() as cur:
                await cur.executemany(UPSERT_RUN, [row.params() for row in rows])
            cur = await conn.execute(
                "SELECT run_id, status, attempts, pages, rows, bytes, http_status, error_code,"
                " trace_id, started_at, finished_at, replay FROM collection_runs ORDER BY run_id"
            )
            return await cur.fetchall()
        finally:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(name))


def test_consecutive_pages_of_a_run_make_one_upsert() -> None:
    items = [_page("a@1", page, last=page == 99, attempt=1) for page in range(100)]
    rows = run_rows(items)
    assert len(rows) == 1
    assert (rows[0].pages, rows[0].status, rows[0].finished_at) == (
        100,
        "stored",
        SLOT + timedelta(seconds=99),
    )
    # Another event of the run ends the stretch: statuses keep their order.
    items.insert(50, _event("a@1", "failed", attempt=1))
    assert [r.status for r in run_rows(items)] == ["fetching", "failed", "stored"]


@pytest.mark.parametrize("seed", range(20))
async def test_merged_upserts_leave_the_same_records(
    seed: int, database_url: str, db_schema: str
) -> None:
    items = _batch(random.Random(seed))
    merged = run_rows(items)
    assert len(merged) < len(items)
    one_by_one = await _records(database_url, f"{db_schema}_a", [row for row, _ in items])
    batched = await _records(database_url, f"{db_schema}_b", merged)
    assert batched == one_by_one
    assert {r[0] for r in batched} == set(RUNS)


async def test_documents_are_compressed_with_lz4_where_the_server_has_it(
    database_url: str, db_schema: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await apply_migrations(conn, db_schema)
        try:
            await conn.execute("CREATE TEMP TABLE probe (j jsonb COMPRESSION lz4)")
            has_lz4 = True
        except psycopg.errors.FeatureNotSupported:
            has_lz4 = False
        cur = await conn.execute(
            "SELECT attname, attcompression FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attname IN ('data', 'body') ORDER BY attname",
            (f"{db_schema}.collected_data",),
        )
        expected = "l" if has_lz4 else ""
        assert await cur.fetchall() == [("body", expected), ("data", expected)]
