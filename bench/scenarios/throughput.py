"""Throughput through the running daemon, against Postgres's plain-COPY ceiling and a peer.

Per run, in one fresh namespace, one after the other on the same servers:

1. **coleta**: 4 sources x 1,000 pages x 100 records (~20 KB pages) collected by the daemon
   subprocess into ``collected_data`` — one paginated run per source when pagination works,
   else 4 x 1,000 single-page runs (manual triggers with distinct ``scheduled_for``). Timed
   from the first trigger to the last row committed (polled every 50 ms).
2. **COPY ceiling**: the very rows coleta wrote, read back beforehand, ``COPY … FROM STDIN``
   into a table made ``LIKE collected_data INCLUDING ALL`` (same indexes and constraints).
3. **peer**: the straightforward design — httpx fetches every page (one task per source),
   then one ``executemany(INSERT … ON CONFLICT DO NOTHING)`` of all rows in one transaction.
4. **coleta in two processes** (not the default; shown for sizing): the same collection with
   the writer in a process of its own (``--role writer`` and ``--role ticker,fetcher,service``
   on the same servers), as the README's scale-out section describes.
5. **coleta with worker processes** (``python -m bench --workers 2,4``; not the default): the
   same collection by ``coleta run --workers N``, compared with the same run's COPY and peer.
"""

from __future__ import annotations

import contextlib
import os
import pstats
import time
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench._infra import (
    CpuMeter,
    Namespace,
    daemon_settings,
    find_pids,
    namespace,
    running_daemon,
)
from bench._report import Measure, Result
from bench.scenarios._common import (
    Context,
    granularity_supported,
    paged_source,
    pagination_works,
    single_page_source,
    trigger,
    trigger_many,
    wait_until,
    workers_label,
)

__all__ = ["run"]

SOURCES = 4
RECORDS_PER_PAGE = 100
# The peer writes the columns of the original design; newer ones keep their defaults. Any
# unique key of the table (it changes as coleta grows) makes a repeat a no-op.
PEER_INSERT = """
INSERT INTO peer_data
    (run_id, source, page, scheduled_for, collected_at, http_status, content_type, data, body)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT DO NOTHING
"""


async def run(ctx: Context) -> Result:
    pages = 100 if ctx.quick else 1000
    paged = await pagination_works(ctx)
    mode = (
        f"{SOURCES} paginated runs x {pages} pages"
        if paged
        else f"{SOURCES} x {pages} single-page runs (pagination not wired yet)"
    )
    total_pages = SOURCES * pages
    result = Result(
        "throughput",
        f"1+2+6. Throughput: {SOURCES} sources x {pages} pages x {RECORDS_PER_PAGE} records"
        f" (~20 KB pages) — {mode}",
    )
    coleta_pps = result.add(Measure("coleta, one row per page", "pages/s"))
    coleta_rps = result.add(Measure("coleta, records carried", "records/s", digits=0))
    per_record = result.add(Measure("coleta, one row per record", "records/s", digits=0))
    by_record = granularity_supported()
    if by_record:
        per_record.note = f"separate run, {SOURCES} x {max(1, pages // 4)} pages"
    else:
        per_record.missing = "n/a (not implemented)"
    copy_rps = result.add(Measure("plain COPY ceiling (same rows, same table)", "rows/s"))
    ratio_copy = result.add(Measure("coleta / COPY ceiling", "x", target=(">=", 0.7), digits=3))
    peer_pps = result.add(Measure("peer: httpx + one bulk insert", "pages/s"))
    ratio_peer = result.add(Measure("coleta / peer", "x", target=(">=", 2.0), digits=2))
    trig = result.add(Measure("coleta: time to queue all runs (triggers)", "s", digits=2))
    cpu_daemon = result.add(Measure("CPU, daemon process", "ms/page", digits=2))
    cpu_nats = result.add(Measure("CPU, nats-server", "ms/page", digits=2))
    cpu_pg = result.add(Measure("CPU, postgres (all backends)", "ms/page", digits=2))
    cpu_mock = result.add(Measure("CPU, mock API", "ms/page", digits=3))
    busy = result.add(Measure("machine busy during the coleta run", "% of all cores"))
    peer_cpu = result.add(Measure("CPU, peer process (fetch + insert)", "ms/page", digits=2))
    split_pps = result.add(
        Measure("coleta in two processes (--role writer apart)", "pages/s", note="not default")
    )
    split_copy = result.add(Measure("  two processes / COPY ceiling", "x", digits=3))
    split_peer = result.add(Measure("  two processes / peer", "x", digits=2))
    more = [w for w in ctx.workers if w > 1]
    many_pps, many_copy, many_peer, many_cpu = {}, {}, {}, {}
    for w in more:
        label = workers_label(w)[2:]
        many_pps[w] = result.add(Measure(f"coleta, {label}", "pages/s", note="not default"))
        many_copy[w] = result.add(Measure(f"  {label} / COPY ceiling", "x", digits=3))
        many_peer[w] = result.add(Measure(f"  {label} / peer", "x", digits=2))
        many_cpu[w] = result.add(
            Measure(f"  CPU, all {w + 1} daemon processes", "ms/page", digits=2)
        )

    for _ in range(ctx.runs):
        async with namespace(ctx.services, "tp") as ns:
            elapsed, trigger_s, meter = await _coleta(ctx, ns, pages, paged)
            coleta_pps.values.append(total_pages / elapsed)
            coleta_rps.values.append(total_pages * RECORDS_PER_PAGE / elapsed)
            trig.values.append(trigger_s)
            cpu_daemon.values.append(meter.used["daemon"] / total_pages * 1000)
            cpu_nats.values.append(meter.used["nats"] / total_pages * 1000)
            cpu_pg.values.append(meter.used["postgres"] / total_pages * 1000)
            cpu_mock.values.append(meter.used["mock"] / total_pages * 1000)
            cores = len(os.sched_getaffinity(0))
            busy.values.append(meter.used["machine"] / meter.wall_s / cores * 100)
            copy_s = await _copy_ceiling(ns)
            copy_rps.values.append(total_pages / copy_s)
            ratio_copy.values.append(coleta_pps.values[-1] / copy_rps.values[-1])
            peer_s, peer_cpu_s = await _peer(ctx, ns, pages, paged)
            peer_pps.values.append(total_pages / peer_s)
            peer_cpu.values.append(peer_cpu_s / total_pages * 1000)
            ratio_peer.values.append(coleta_pps.values[-1] / peer_pps.values[-1])
        async with namespace(ctx.services, "tpsplit") as ns:
            elapsed, _, _ = await _coleta(ctx, ns, pages, paged, split=True)
            split_pps.values.append(total_pages / elapsed)
            split_copy.values.append(split_pps.values[-1] / copy_rps.values[-1])
            split_peer.values.append(split_pps.values[-1] / peer_pps.values[-1])
        for w in more:
            async with namespace(ctx.services, "tpw") as ns:
                elapsed, _, meter = await _coleta(ctx, ns, pages, paged, workers=w)
                many_pps[w].values.append(total_pages / elapsed)
                many_copy[w].values.append(many_pps[w].values[-1] / copy_rps.values[-1])
                many_peer[w].values.append(many_pps[w].values[-1] / peer_pps.values[-1])
                many_cpu[w].values.append(meter.used["daemon"] / total_pages * 1000)
        if by_record:
            # A quarter of the pages: 100,000 rows in a full run is plenty for a rate.
            record_pages = max(1, pages // 4)
            async with namespace(ctx.services, "tprec") as ns:
                elapsed, _, _ = await _coleta(ctx, ns, record_pages, paged, by_record=True)
                per_record.values.append(SOURCES * record_pages * RECORDS_PER_PAGE / elapsed)
    if ctx.profile:
        async with namespace(ctx.services, "tpprof") as ns:
            out = ctx.results_dir / "profile-throughput.prof"
            await _coleta(ctx, ns, pages, paged, profile_to=out)
        text = _summarise_profile(out)
        (ctx.results_dir / "profile-throughput.txt").write_text(text)
        result.notes.append(
            f"cProfile of one extra (unmeasured) daemon run: {ctx.results_dir.name}/"
            "profile-throughput.txt"
        )
    result.notes += [
        "coleta: daemon subprocess with default settings (max_concurrent_fetches 8,"
        " writer_batch_size 256, file storage, one run per source at a time); timed from the"
        " first trigger to the last collected_data row committed.",
        "ratios are per run (coleta and its comparison measured back to back), then the median;"
        " the two-process and --workers runs come right after, compared with the same run's"
        " COPY and peer.",
        "CPU ms/page: process CPU time over the coleta run / pages; postgres sums every backend"
        " (other clients of the same server included).",
    ]
    if not paged:
        result.notes.append(
            "pagination is not wired yet (settings refuse [sources.pagination] or a run stores"
            " one page): each page is its own run, so every page also pays a run's overhead"
            " (command, lease, started event, run record)."
        )
    return result


async def _coleta(
    ctx: Context,
    ns: Namespace,
    pages: int,
    paged: bool,
    *,
    profile_to: Path | None = None,
    by_record: bool = False,
    split: bool = False,
    workers: int | None = None,
) -> tuple[float, float, CpuMeter]:
    extra = {"granularity": "record", "records_path": "items"} if by_record else {}
    if paged:
        sources = [paged_source(ctx.mock, f"src{i}", pages, **extra) for i in range(SOURCES)]
    else:
        sources = [single_page_source(ctx.mock, f"src{i}") | extra for i in range(SOURCES)]
    config = daemon_settings(ns, sources)
    wrap = ["-m", "cProfile", "-o", str(profile_to)] if profile_to else []
    expected = SOURCES * pages * (RECORDS_PER_PAGE if by_record else 1)
    async with contextlib.AsyncExitStack() as stack:
        pids: list[int] = []
        if split:
            # The writer in a process of its own: the pipeline gets a second Python thread.
            writer = await stack.enter_async_context(running_daemon(config, roles="writer"))
            pids.append(writer.pid)
        daemon = await stack.enter_async_context(
            running_daemon(
                config,
                wrap=wrap,
                roles="ticker,fetcher,service" if split else None,
                workers=workers,
            )
        )
        pids += daemon.pids
        conn = await ns.aconnect()
        nc = await ns.nats()
        try:
            meter = CpuMeter(
                {
                    "daemon": pids,
                    "nats": find_pids("nats-server"),
                    "postgres": find_pids("postgres"),
                    "mock": [ctx.mock.pid],
                }
            )
            meter.start()
            started = time.monotonic()
            if paged:
                for i in range(SOURCES):
                    await trigger(nc, ns.prefix, f"src{i}")
            else:
                base = datetime(2026, 1, 1, tzinfo=UTC)
                requests: list[tuple[str, datetime | None]] = [
                    (f"src{s}", base + timedelta(minutes=p))
                    for p in range(pages)
                    for s in range(SOURCES)
                ]
                await trigger_many(nc, ns.prefix, requests)
            trigger_s = time.monotonic() - started
            await wait_until(
                conn,
                "SELECT count(*), (SELECT count(*) FROM collection_runs WHERE status = 'failed')"
                " FROM collected_data",
                lambda row: row[0] >= expected or row[1] > 0,
                within_s=900,
                what=f"{expected} rows",
            )
            elapsed = time.monotonic() - started
            meter.stop()
            cur = await conn.execute("SELECT count(*) FROM collection_runs WHERE status='failed'")
            failed = await cur.fetchone()
            if failed and failed[0]:
                raise RuntimeError(f"{failed[0]} runs failed; see {daemon.log}")
        finally:
            await nc.close()
            await conn.close()
    return elapsed, trigger_s, meter


async def _copy_ceiling(ns: Namespace) -> float:
    """Seconds to COPY the rows coleta wrote into an identical table (read back untimed)."""
    conn = await ns.aconnect()
    async with conn:
        await conn.execute("CREATE TABLE copy_ceiling (LIKE collected_data INCLUDING ALL)")
        cur = await conn.execute(
            "SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position)"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = 'collected_data' AND is_identity = 'NO'"
        )
        found = await cur.fetchone()
        assert found is not None
        columns = found[0]
        blocks: list[bytes] = []
        async with conn.cursor() as cur:
            async with cur.copy(f"COPY collected_data ({columns}) TO STDOUT") as copy:
                async for block in copy:
                    blocks.append(bytes(block))
            started = time.monotonic()
            async with (
                conn.transaction(),
                cur.copy(f"COPY copy_ceiling ({columns}) FROM STDIN") as copy,
            ):
                for block in blocks:
                    await copy.write(block)
            return time.monotonic() - started


async def _peer(ctx: Context, ns: Namespace, pages: int, paged: bool) -> tuple[float, float]:
    """The straightforward design; (wall seconds, CPU seconds of this process)."""
    conn = await ns.aconnect()
    async with conn:
        await conn.execute("CREATE TABLE peer_data (LIKE collected_data INCLUDING ALL)")
        rows: list[tuple[Any, ...]] = []
        cpu0, started = time.process_time(), time.monotonic()
        async with httpx.AsyncClient(timeout=30) as client:

            async def collect(source: str) -> None:
                for p in range(pages):
                    page = p + 1 if paged else 1
                    params = {"page": str(page), "pages": str(pages if paged else 1)}
                    response = await client.get(ctx.mock.url("/pages"), params=params)
                    response.raise_for_status()
                    run_id = f"peer-{source}" if paged else f"peer-{source}-{p}"
                    rows.append(
                        (
                            run_id,
                            source,
                            p if paged else 0,
                            None,
                            datetime.now(UTC),
                            response.status_code,
                            response.headers.get("content-type"),
                            response.text,
                            None,
                        )
                    )

            async with anyio.create_task_group() as tg:
                for i in range(SOURCES):
                    tg.start_soon(collect, f"src{i}")
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(PEER_INSERT, rows)
        return time.monotonic() - started, time.process_time() - cpu0


def _summarise_profile(path: Path) -> str:
    out = StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return out.getvalue()
