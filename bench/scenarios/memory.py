"""Peak memory of the daemon process: one 50 MB response, and 1,000 pages in one run.

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


async def run(ctx: Context) -> Result:
    result = Result("memory", "5. Memory: peak RSS (VmHWM) of the daemon process")
    idle = result.add(Measure("idle, after start-up", "MiB"))
    big = result.add(Measure(f"one {BIG_MB} MB response", "MiB", target=("<", 150)))
    big_s = result.add(Measure(f"  time for the {BIG_MB} MB run", "s", digits=2))
    paged = result.add(Measure(f"{PAGES:,} pages in one run", "MiB", target=("<", 150)))
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
