"""What every scenario shares: the context, feature probes, triggering and waiting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
from nats.aio.client import Client

from bench._infra import MockAPI, Services, daemon_settings, namespace, running_daemon
from daemon.errors import ConfigError
from daemon.settings import parse_settings

__all__ = [
    "NEVER",
    "Context",
    "granularity_supported",
    "paged_source",
    "pagination_supported",
    "pagination_works",
    "single_page_source",
    "trigger",
    "trigger_many",
    "wait_until",
    "workers_label",
]

#: A schedule that does not fire while a benchmark runs: runs come from triggers.
NEVER = "0 0 1 1 *"
PAGES = 1000


@dataclass(frozen=True, slots=True)
class Context:
    services: Services
    mock: MockAPI
    quick: bool
    runs: int
    results_dir: Path
    profile: bool = False
    #: ``coleta run --workers`` counts to measure throughput and fan-out with.
    workers: tuple[int, ...] = (1,)


def workers_label(count: int) -> str:
    """How a measure names the daemon's worker processes."""
    return "" if count == 1 else f", --workers {count}"


def _accepts(extra: dict[str, Any]) -> bool:
    source = {"name": "probe", "url": "http://127.0.0.1/x", "schedule": NEVER, **extra}
    try:
        parse_settings({"sources": [source]}, "probe")
    except ConfigError:
        return False
    return True


def pagination_config(pages: int) -> dict[str, Any]:
    return {
        "kind": "page",
        "page_param": "page",
        "first_page": 1,
        "has_more_path": "has_more",
        "records_path": "items",
        "max_pages": pages,
    }


def pagination_supported() -> bool:
    """Whether settings accept a ``[sources.pagination]`` table (not yet whether it works)."""
    return _accepts({"pagination": pagination_config(3)})


def granularity_supported() -> bool:
    """Whether settings accept ``granularity = "record"`` (one row per record)."""
    extra: dict[str, Any] = {"granularity": "record", "records_path": "items"}
    if pagination_supported():
        extra["pagination"] = pagination_config(3)
    return _accepts(extra)


def single_page_source(mock: MockAPI, name: str) -> dict[str, Any]:
    """A source whose every run is one ~20 KB page of 100 records."""
    return {
        "name": name,
        "url": mock.url("/pages"),
        "params": {"page": "1", "pages": "1"},
        "schedule": NEVER,
        "catchup": "none",
    }


def paged_source(mock: MockAPI, name: str, pages: int, **extra: Any) -> dict[str, Any]:
    """A source whose every run walks ``pages`` pages by page number."""
    return {
        "name": name,
        "url": mock.url("/pages"),
        "params": {"pages": str(pages)},
        "schedule": NEVER,
        "catchup": "none",
        "pagination": pagination_config(pages),
        **extra,
    }


async def trigger(
    nc: Client, prefix: str, source: str, scheduled_for: datetime | None = None
) -> str:
    """Ask ``<prefix>.trigger`` for a run; its run id. Raises on an error reply."""
    body: dict[str, Any] = {"source": source}
    if scheduled_for is not None:
        body["scheduled_for"] = scheduled_for.isoformat()
    reply = await nc.request(f"{prefix}.trigger", msgspec.json.encode(body), timeout=30)
    if reply.headers and "Nats-Service-Error" in reply.headers:
        raise RuntimeError(f"trigger {source}: {reply.headers['Nats-Service-Error']}")
    run_id: str = msgspec.json.decode(reply.data)["run_id"]
    return run_id


async def trigger_many(
    nc: Client,
    prefix: str,
    requests: Sequence[tuple[str, datetime | None]],
    *,
    concurrency: int = 32,
) -> list[str]:
    """Trigger every ``(source, scheduled_for)``, ``concurrency`` requests in flight."""
    run_ids: list[str] = [""] * len(requests)
    limit = anyio.Semaphore(concurrency)

    async def one(i: int, source: str, when: datetime | None) -> None:
        async with limit:
            run_ids[i] = await trigger(nc, prefix, source, when)

    async with anyio.create_task_group() as tg:
        for i, (source, when) in enumerate(requests):
            await limit.acquire()  # keep the task count bounded
            limit.release()
            tg.start_soon(one, i, source, when)
    return run_ids


async def wait_until(
    conn: psycopg.AsyncConnection[Any],
    query: str,
    done: Callable[[tuple[Any, ...]], bool],
    *,
    within_s: float,
    interval_s: float = 0.05,
    what: str = "",
) -> tuple[Any, ...]:
    """Poll ``query`` (one row) until ``done(row)``; TimeoutError naming ``what`` after that."""
    row: tuple[Any, ...] = ()
    with anyio.move_on_after(within_s):
        while True:
            cur = await conn.execute(query)
            found = await cur.fetchone()
            row = tuple(found) if found is not None else ()
            if row and done(row):
                return row
            await anyio.sleep(interval_s)
    raise TimeoutError(f"{what or query}: not done after {within_s:g} s (last: {row!r})")


async def pagination_works(ctx: Context) -> bool:
    """Settings accept pagination and a 3-page run really stores 3 pages."""
    if not pagination_supported():
        return False
    async with namespace(ctx.services, "probe") as ns:
        config = daemon_settings(ns, [paged_source(ctx.mock, "probe", 3)])
        async with running_daemon(config):
            nc = await ns.nats()
            try:
                run_id = await trigger(nc, ns.prefix, "probe")
            finally:
                await nc.close()
            conn = await ns.aconnect()
            async with conn:
                await wait_until(
                    conn,
                    f"SELECT count(*) FROM collection_runs WHERE run_id = '{run_id}'"
                    " AND status IN ('stored', 'failed')",
                    lambda row: row[0] == 1,
                    within_s=30,
                    what="the probe run",
                )
                cur = await conn.execute(
                    "SELECT count(*) FROM collected_data WHERE run_id = %s", (run_id,)
                )
                found = await cur.fetchone()
                return found is not None and found[0] > 1
