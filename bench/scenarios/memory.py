"""Peak memory of the daemon process: one 50 MB response, 1,000 pages in one run, 300 MB error
pages, and ten 30 MB responses at once.

Each measurement starts a fresh daemon subprocess, triggers one run, waits until the run is
``stored`` (or ``failed``) and reads the process's high-water mark ``VmHWM`` from
``/proc/<pid>/status``. The idle row is the high-water mark right after start-up.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench._infra import daemon_settings, namespace, running_daemon
from bench._report import Measure, Result
from bench.scenarios._common import (
    NEVER,
    Context,
    paged_source,
    pagination_works,
    trigger,
    wait_until,
)

__all__ = ["run"]

BIG_MB = 50
PAGES = 1000
#: A ``500`` this large must be read a few KiB at most (``fetcher._client.ERROR_BODY_BYTES``).
ERROR_MB = 300
ERRORS_AT_ONCE = 3
#: Ten responses of this size fetched, moved and written at once.
CONCURRENT = 10
CONCURRENT_MB = 30
TARGET_MIB = 200


async def run(ctx: Context) -> Result:
    result = Result("memory", "5. Memory: peak RSS (VmHWM) of the daemon process")
    idle = result.add(Measure("idle, after start-up", "MiB"))
    big = result.add(Measure(f"one {BIG_MB} MB response", "MiB", target=("<", 150)))
    big_s = result.add(Measure(f"  time for the {BIG_MB} MB run", "s", digits=2))
    paged = result.add(Measure(f"{PAGES:,} pages in one run", "MiB", target=("<", 150)))
    errors = result.add(
        Measure(
            f"{ERRORS_AT_ONCE} runs answered by {ERROR_MB} MB error pages",
            "MiB",
            target=("<", TARGET_MIB),
        )
    )
    many = result.add(
        Measure(
            f"{CONCURRENT} responses of {CONCURRENT_MB} MB at once",
            "MiB",
            target=("<", TARGET_MIB),
        )
    )
    # The mock builds the big body on its first request: do that outside the measurement.
    async with httpx.AsyncClient(timeout=120) as client:
        await client.get(ctx.mock.url(f"/big?mb={BIG_MB}"))
    source: dict[str, Any] = {
        "name": "big",
        "url": ctx.mock.url(f"/big?mb={BIG_MB}"),
        "schedule": NEVER,
        "catchup": "none",
        "timeout_s": 120,
    }
    for _ in range(ctx.runs):
        hwm_idle, hwm, seconds = await _peak(ctx, source, "big")
        idle.values.append(hwm_idle)
        big.values.append(hwm)
        big_s.values.append(seconds)
    if await pagination_works(ctx):
        for _ in range(ctx.runs):
            _, hwm, _ = await _peak(ctx, paged_source(ctx.mock, "paged", PAGES), "paged")
            paged.values.append(hwm)
    else:
        paged.missing = "n/a (pagination not wired)"
    async with httpx.AsyncClient(timeout=120) as client:
        await client.get(ctx.mock.url(f"/big?mb={CONCURRENT_MB}"))
    failing = [
        {
            "name": f"error{i}",
            "url": ctx.mock.url(f"/error?mb={ERROR_MB}"),
            "schedule": NEVER,
            "catchup": "none",
            "retries": {"max_attempts": 1},
        }
        for i in range(ERRORS_AT_ONCE)
    ]
    concurrent = [
        {
            "name": f"big{i}",
            "url": ctx.mock.url(f"/big?mb={CONCURRENT_MB}"),
            "schedule": NEVER,
            "catchup": "none",
            "timeout_s": 120,
        }
        for i in range(CONCURRENT)
    ]
    for _ in range(ctx.runs):
        errors.values.append(await _peak_of_many(ctx, failing, want="failed"))
        many.values.append(await _peak_of_many(ctx, concurrent, want="stored"))
    result.notes.append(
        f"the {ERROR_MB} MB error pages are 500s: each run fails, having read a few KiB of its"
        f" body; the {CONCURRENT} responses of {CONCURRENT_MB} MB are fetched"
        f" ({CONCURRENT} fetches at once), moved through the object store and written together."
    )
    result.notes.append(
        f"the {BIG_MB} MB body is a JSON array of ~200-byte records; it travels through the"
        " JetStream object store (over max_payload) and lands in one jsonb row."
    )
    return result


async def _peak(ctx: Context, source: dict[str, Any], name: str) -> tuple[float, float, float]:
    async with (
        namespace(ctx.services, "mem") as ns,
        running_daemon(daemon_settings(ns, [source])) as daemon,
    ):
        idle = daemon.peak_rss_mib()
        nc = await ns.nats()
        conn = await ns.aconnect()
        try:
            started = time.monotonic()
            run_id = await trigger(nc, ns.prefix, name)
            row = await wait_until(
                conn,
                f"SELECT status, error FROM collection_runs WHERE run_id = '{run_id}'",
                lambda row: row[0] in ("stored", "failed"),
                within_s=300,
                interval_s=0.1,
                what=f"the {name} run",
            )
            seconds = time.monotonic() - started
            if row[0] != "stored":
                raise RuntimeError(f"the {name} run failed: {row[1]}")
            return idle, daemon.peak_rss_mib(), seconds
        finally:
            await conn.close()
            await nc.close()


async def _peak_of_many(ctx: Context, sources: list[dict[str, Any]], *, want: str) -> float:
    """Peak RSS of a daemon running one run of each source, all triggered at once."""
    async with (
        namespace(ctx.services, "mem") as ns,
        running_daemon(daemon_settings(ns, sources, max_concurrent_fetches=len(sources))) as daemon,
    ):
        nc = await ns.nats()
        conn = await ns.aconnect()
        try:
            run_ids = [await trigger(nc, ns.prefix, source["name"]) for source in sources]
            ids = ", ".join(f"'{run_id}'" for run_id in run_ids)
            rows = await wait_until(
                conn,
                f"SELECT count(*) FILTER (WHERE status = '{want}'), count(*) FILTER (WHERE"
                f" status IN ('stored', 'failed', 'unchanged')) FROM collection_runs"
                f" WHERE run_id IN ({ids})",
                lambda row: row[1] == len(run_ids),
                within_s=600,
                interval_s=0.2,
                what="every run finished",
            )
            if rows[0] != len(run_ids):
                raise RuntimeError(f"{len(run_ids) - rows[0]} runs did not end {want}")
            return daemon.peak_rss_mib()
        finally:
            await conn.close()
            await nc.close()
