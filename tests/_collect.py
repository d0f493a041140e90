"""Helpers for end-to-end collection tests: trigger a run, wait for its outcome, read rows."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import nats
import nats.js.errors
import psycopg

from tests.fix_daemon import Requester, wait_for
from tests.fix_http import LocalAPI

FAST_RETRY = {"max_attempts": 3, "max_backoff_s": 0.2}
FINAL = ("stored", "unchanged", "failed")


def source(api: LocalAPI, name: str, path: str, **extra: Any) -> dict[str, Any]:
    """A source that never fires on its own (triggered by the test)."""
    return {"name": name, "url": api.url(path), "schedule": "0 0 1 1 *", **extra}


def run_row(db: psycopg.Connection[Any], run_id: str) -> dict[str, Any] | None:
    """The ``collection_runs`` record of ``run_id`` (outcome and counts), or None."""
    cur = db.execute(
        "SELECT status, attempts, pages, rows, bytes, http_status, error_code, error, note, replay"
        " FROM collection_runs WHERE run_id = %s",
        (run_id,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    names = [c.name for c in cur.description or []]
    return dict(zip(names, row, strict=True))


def finished(db: psycopg.Connection[Any], run_id: str) -> dict[str, Any] | None:
    """The run's record once it has a final status, else None (for ``wait_for``)."""
    row = run_row(db, run_id)
    return row if row and row["status"] in FINAL else None


async def trigger(request_reply: Requester, name: str) -> str:
    """Trigger a run of source ``name``; returns its run id."""
    reply = await request_reply("trigger", {"source": name})
    return str(msgspec.json.decode(reply.data)["run_id"])


async def run(request_reply: Requester, db: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    """Trigger ``name`` and wait for the run's final record (run_id included)."""
    run_id = await trigger(request_reply, name)
    row = await wait_for(lambda: finished(db, run_id), what=f"run {run_id} to finish")
    return {"run_id": run_id, **row}


def data_rows(db: psycopg.Connection[Any], run_id: str) -> list[tuple[Any, ...]]:
    """``(page, record, data, body)`` of a run's rows, in order."""
    return db.execute(
        "SELECT page, record, data, body FROM collected_data WHERE run_id = %s"
        " ORDER BY page, record",
        (run_id,),
    ).fetchall()


async def kv_value(nats_url: str, bucket: str, key: str) -> Any:
    """The decoded JSON value of ``key`` in ``bucket``, or None."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return msgspec.json.decode(entry.value) if entry.value else None
    finally:
        await nc.close()


async def wait_for_source_state(nats_url: str, prefix: str, name: str, **expected: Any) -> None:
    """Wait until the fetcher's copy of ``name``'s source state holds ``expected``."""
    last: Any = None
    for _ in range(200):
        last = await kv_value(nats_url, f"{prefix}_sources", name) or {}
        if all(last.get(k) == v for k, v in expected.items()):
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"source state of {name} never became {expected}: {last!r}")
