"""Helpers for collection tests: a source (``source``, ``source_config``), trigger a run,
wait for its outcome, read its rows, the state the writer copied for the fetcher."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import msgspec
import nats
import nats.js.errors
import psycopg

from daemon.settings import SourceConfig
from daemon.template import Window
from tests.fix_daemon import Requester, wait_for
from tests.fix_http import LocalAPI

FAST_RETRY = {"max_attempts": 3, "max_backoff_s": 0.2}
FINAL = ("stored", "unchanged", "failed")


#: A schedule that never fires while a test runs: a test triggers the runs it wants.
NEVER = "0 0 1 1 *"


def source(
    api: LocalAPI | str | None = None, name: str = "rates", path: str = "/rates", **extra: Any
) -> dict[str, Any]:
    """A source table named ``name``, at ``path`` of ``api`` (a local API, a base URL, or
    ``https://api.example``); it never fires on its own unless ``schedule`` is given, and
    ``extra`` sets any other key."""
    url = api.url(path) if isinstance(api, LocalAPI) else f"{api or 'https://api.example'}{path}"
    return {"name": name, "url": url, "schedule": NEVER, **extra}


def source_config(
    api: LocalAPI | str | None = None, name: str = "rates", path: str = "/rates", **extra: Any
) -> SourceConfig:
    """``source(…)`` as the settings hold it."""
    return msgspec.convert(source(api, name, path, **extra), SourceConfig)


def window(tz: str = "UTC") -> Window:
    """A daily run for the 23:30Z slot of 2026-03-14 (what templates and requests render)."""
    return Window(
        source="rates",
        run_id="rates@20260314T233000Z",
        scheduled_for=datetime(2026, 3, 14, 23, 30, tzinfo=UTC),
        interval_start=datetime(2026, 3, 13, 23, 30, tzinfo=UTC),
        tz=ZoneInfo(tz),
    )


def run_status(db: psycopg.Connection[Any], run_id: str) -> str | None:
    """The status of ``run_id`` in ``collection_runs``, or None before its first event."""
    row = db.execute("SELECT status FROM collection_runs WHERE run_id = %s", (run_id,)).fetchone()
    return row[0] if row else None


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


#: Sources of the tests that need many (status pages, the CLI following them).
SOURCES = 2000
#: The length of their last run's error.
ERROR_CHARS = 5000


def many_sources(n: int = SOURCES) -> list[dict[str, Any]]:
    return [source("http://127.0.0.1:9", f"src{i:04d}", "/never") for i in range(n)]


def insert_failed_runs(db: psycopg.Connection[Any], n: int = SOURCES) -> None:
    """One failed run per source, newest for ``src0000``, each with a 5,000-character error."""
    db.execute(
        "INSERT INTO collection_runs (run_id, source, trigger, scheduled_for, status, attempts,"
        " http_status, error, trace_id, created_at, queued_at, started_at, finished_at)"
        " SELECT format('src%%s@20261201T000000Z-manual-%%s', lpad(i::text, 4, '0'), i),"
        "  format('src%%s', lpad(i::text, 4, '0')), 'manual', now() - interval '1 day',"
        "  'failed', 3, 500, format('HTTP 500: %%s', repeat('e', %s)), repeat('a', 32),"
        "  now() - i * interval '1 second', now(), now(), now()"
        " FROM generate_series(0, %s - 1) AS i",
        (ERROR_CHARS, n),
    )
