"""Fan-out: hundreds of one-page sources due at once — the most common coleta workload.

Per run, in one fresh namespace, one after the other on the same servers:

1. **coleta**: 250 one-page sources (~20 KB pages of 100 records), each triggered 4 times at
   once (1,000 runs), collected by the daemon subprocess with its default settings. Timed from
   the first trigger to the last row committed.
2. **COPY ceiling**: the rows coleta wrote, ``COPY … FROM STDIN`` into an identical table.
3. **straightforward design**: httpx fetches the same 1,000 pages (as many at once as coleta's
   ``max_concurrent_fetches``), then one bulk insert of every row, no bus.

Daemon CPU is the daemon process's CPU time over its run, per run (one-page run = one page);
with ``--workers N`` (``python -m bench --workers 1,2,4``) coleta is measured once per count,
each in a fresh namespace, its CPU summed over the main process and its N workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench._infra import CpuMeter, Namespace, daemon_settings, find_pids, namespace, running_daemon
from bench._profile import sampling, summary
from bench._report import Measure, Result
from bench.scenarios._common import (
    Context,
    single_page_source,
    trigger_many,
    wait_until,
    workers_label,
)
from bench.scenarios.throughput import PEER_INSERT, _copy_ceiling

__all__ = ["run"]

SOURCES = 250
TIMES = 4
#: What coleta runs at once by default (``max_concurrent_fetches``): the peer gets the same.
CONCURRENCY = 8


async def run(ctx: Context) -> Result:
    sources = 50 if ctx.quick else SOURCES
    runs = sources * TIMES
    result = Result(
        "fanout",
        f"7. Fan-out: {sources} one-page sources x {TIMES} triggers at once ({runs:,} runs,"
        " ~20 KB pages of 100 records)",
    )
    coleta = {
        w: result.add(Measure(f"coleta, one-page runs{workers_label(w)}", "pages/s"))
        for w in ctx.workers
    }
    copy = result.add(Measure("plain COPY of the same rows (same table)", "rows/s"))
    peer = result.add(Measure("straightforward design: httpx + one bulk insert", "pages/s"))
    vs_peer, vs_copy, cpu, cpu_nats, cpu_pg, busy = {}, {}, {}, {}, {}, {}
    for w in ctx.workers:
        label = workers_label(w)
        vs_peer[w] = result.add(
            Measure(f"coleta{label} / straightforward", "x", target=(">=", 2.0), digits=2)
        )
        vs_copy[w] = result.add(Measure(f"coleta{label} / COPY", "x", target=(">=", 0.5), digits=3))
    for w in ctx.workers:
        label = workers_label(w)
        what = "daemon" if w == 1 else f"daemon, all {w + 1} processes"
        cpu[w] = result.add(Measure(f"CPU, {what}", "ms/run", target=("<=", 0.6), digits=2))
        cpu_nats[w] = result.add(Measure(f"CPU, nats-server{label}", "ms/run", digits=2))
        cpu_pg[w] = result.add(Measure(f"CPU, postgres (all backends){label}", "ms/run", digits=2))
        busy[w] = result.add(
            Measure(f"machine busy during the coleta run{label}", "% of all cores")
        )
    for _ in range(ctx.runs):
        rates: dict[int, float] = {}
        for w in ctx.workers:
            async with namespace(ctx.services, "fan") as ns:
                elapsed, meter = await _coleta(ctx, ns, sources, w)
                rates[w] = runs / elapsed
                coleta[w].values.append(rates[w])
                cpu[w].values.append(meter.used["daemon"] / runs * 1000)
                cpu_nats[w].values.append(meter.used["nats"] / runs * 1000)
                cpu_pg[w].values.append(meter.used["postgres"] / runs * 1000)
                cores = len(os.sched_getaffinity(0))
                busy[w].values.append(meter.used["machine"] / meter.wall_s / cores * 100)
                if w == ctx.workers[0]:
                    copy.values.append(runs / await _copy_ceiling(ns))
                    peer.values.append(runs / await _peer(ctx, ns, runs))
        for w, rate in rates.items():
            vs_peer[w].values.append(rate / peer.values[-1])
            vs_copy[w].values.append(rate / copy.values[-1])
    if ctx.profile:
        async with namespace(ctx.services, "fanprof") as ns:
            counts = ctx.results_dir / "profile-fanout.json"
            raw = ctx.results_dir / "profile-fanout.raw"
            used: dict[str, float] = {}
            _, meter = await _coleta(ctx, ns, sources, 1, probe=(counts, raw, used))
        async with namespace(ctx.services, "fanprof") as ns:
            cpu_counts = ctx.results_dir / "profile-fanout-cpu.json"
            await _coleta(ctx, ns, sources, 1, probe=(cpu_counts, Path(), {}), cprofile=True)
        cpu_ms = meter.used["daemon"] / runs * 1000
        prof = cpu_counts.with_suffix(".prof")
        text = summary(counts, raw, prof, runs, cpu_ms, used)
        (ctx.results_dir / "profile-fanout.md").write_text(text)
        result.notes.append(
            "profile of two extra (unmeasured) runs, counters, py-spy samples and cProfile:"
            f" {ctx.results_dir.name}/profile-fanout.md"
        )
    result.notes += [
        "coleta: daemon subprocess with default settings (max_concurrent_fetches 8, one process;"
        " --workers N: N worker processes fetching and writing, each with those settings, beside"
        " the main process ticking and answering);"
        " the 1,000 triggers go through coleta.trigger, 32 requests in flight.",
        "ratios are per run (each coleta measurement, COPY and the straightforward design in the"
        " same run; COPY and the straightforward design right after the first coleta one),"
        " then the median.",
    ]
    return result


async def _coleta(
    ctx: Context,
    ns: Namespace,
    sources: int,
    workers: int,
    *,
    probe: tuple[Path, Path, dict[str, float]] | None = None,
    cprofile: bool = False,
) -> tuple[float, CpuMeter]:
    """Time the runs (``workers``: ``coleta run --workers``); with ``probe`` (counters file,
    samples file, user/system CPU out) the daemon runs under ``bench._probe`` and py-spy
    samples it over the same window (or, with ``cprofile``, cProfile does)."""
    config = daemon_settings(
        ns, [single_page_source(ctx.mock, f"s{i:03d}") for i in range(sources)]
    )
    expected = sources * TIMES
    wrap: list[str] = []
    if probe:
        wrap = ["-m", "bench._probe", str(probe[0]), *(["--cprofile"] if cprofile else [])]
    async with running_daemon(
        config, wrap=wrap, workers=workers if workers > 1 else None
    ) as daemon:
        conn = await ns.aconnect()
        nc = await ns.nats()
        try:
            meter = CpuMeter(
                {
                    "daemon": daemon.pids,
                    "nats": find_pids("nats-server"),
                    "postgres": find_pids("postgres"),
                    "mock": [ctx.mock.pid],
                }
            )
            requests: list[tuple[str, datetime | None]] = [
                (f"s{i:03d}", None) for _ in range(TIMES) for i in range(sources)
            ]
            if probe:
                daemon.process.send_signal(signal.SIGUSR1)  # the counters start now
            sampled: contextlib.AbstractContextManager[dict[str, float]] = (
                sampling(daemon.pid, probe[1])
                if probe and not cprofile
                else contextlib.nullcontext({})
            )
            with sampled as used:
                meter.start()
                started = time.monotonic()
                await trigger_many(nc, ns.prefix, requests)
                await wait_until(
                    conn,
                    "SELECT count(*),"
                    " (SELECT count(*) FROM collection_runs WHERE status = 'failed')"
                    " FROM collected_data",
                    lambda row: row[0] >= expected or row[1] > 0,
                    within_s=600,
                    what=f"{expected} rows",
                )
                elapsed = time.monotonic() - started
                meter.stop()
            if probe:
                probe[2].update(used)
            cur = await conn.execute("SELECT count(*) FROM collection_runs WHERE status='failed'")
            failed = await cur.fetchone()
            if failed and failed[0]:
                raise RuntimeError(f"{failed[0]} runs failed; see {daemon.log}")
        finally:
            await nc.close()
            await conn.close()
    return elapsed, meter


async def _peer(ctx: Context, ns: Namespace, runs: int) -> float:
    """The straightforward design: fetch every page, then insert every row at once."""
    conn = await ns.aconnect()
    async with conn:
        await conn.execute("CREATE TABLE peer_data (LIKE collected_data INCLUDING ALL)")
        rows: list[tuple[Any, ...]] = []
        started = time.monotonic()
        limit = anyio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=30) as client:

            async def collect(i: int) -> None:
                async with limit:
                    response = await client.get(
                        ctx.mock.url("/pages"), params={"page": "1", "pages": "1"}
                    )
                response.raise_for_status()
                rows.append(
                    (
                        f"peer-{i}",
                        f"s{i % SOURCES:03d}",
                        0,
                        None,
                        datetime.now(UTC),
                        response.status_code,
                        response.headers.get("content-type"),
                        response.text,
                        None,
                    )
                )

            async with anyio.create_task_group() as tg:
                for i in range(runs):
                    tg.start_soon(collect, i)
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(PEER_INSERT, rows)
        return time.monotonic() - started
