"""Latency of one run: trigger request sent → its row committed in PostgreSQL.

A trigger on ``collected_data`` (added to the run's own schema after the daemon migrated it)
sends ``NOTIFY`` with the run id; PostgreSQL delivers a notification only after the commit, so
its arrival is "row committed". Runs are sequential (one in flight), the first few are warm-up,
and every interval is taken with ``time.monotonic()``.

A run is ~25 hops across five processes (the daemon, NATS, PostgreSQL, the mock API, this one);
on a small machine anything else running stretches every hop (two busy loops on two cores:
p50 from ~10 ms to ~35 ms). So the CPU that other processes used during the measured runs is
reported next to the latencies, and a measurement taken on a busy machine says so.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import psycopg
from psycopg import sql

from bench._infra import CpuMeter, daemon_settings, find_pids, namespace, running_daemon
from bench._report import Measure, Result, percentile
from bench.scenarios._common import Context, single_page_source, trigger

__all__ = ["run"]

WARMUP = 10
#: Other processes' CPU above this (% of one core) makes the latencies untrustworthy.
BUSY_MACHINE_PCT = 20.0


async def run(ctx: Context) -> Result:
    count = 50 if ctx.quick else 200
    result = Result("latency", f"3. Latency: one-page run, trigger -> row committed ({count} runs)")
    p50 = result.add(Measure("p50", "ms", target=("<", 20), digits=1))
    p99 = result.add(Measure("p99", "ms", target=("<", 100), digits=1))
    worst = result.add(Measure("max", "ms", digits=1))
    others = result.add(Measure("other processes' CPU during the runs", "% of a core", digits=0))
    for _ in range(ctx.runs):
        samples, meter = await _one_run(ctx, count)
        p50.values.append(percentile(samples, 50))
        p99.values.append(percentile(samples, 99))
        worst.values.append(max(samples))
        others.values.append(_others_pct(meter))
    if max(others.values) > BUSY_MACHINE_PCT:
        others.note = "the machine was busy with other work: latencies are inflated"
        for measure in (p50, p99, worst):
            measure.note = "disturbed: see the last row"
    result.notes += [
        f"{WARMUP} warm-up runs first, not counted; one run in flight at a time; ~20 KB page.",
        "measured from just before the NATS trigger request to the NOTIFY of an AFTER INSERT"
        " trigger on collected_data arriving (PostgreSQL sends it after the commit).",
        "other processes' CPU: the machine's busy time during the measured runs less that of"
        " the daemon, the mock API, this process, nats-server and postgres (whose work for"
        f" others is not told apart); above {BUSY_MACHINE_PCT:g}% the run was disturbed.",
    ]
    return result


def _others_pct(meter: CpuMeter) -> float:
    ours = sum(used for name, used in meter.used.items() if name != "machine")
    return max(0.0, meter.used["machine"] - ours) / meter.wall_s * 100


async def _one_run(ctx: Context, count: int) -> tuple[list[float], CpuMeter]:
    async with namespace(ctx.services, "lat") as ns:
        config = daemon_settings(ns, [single_page_source(ctx.mock, "one")])
        async with running_daemon(config) as daemon:
            channel = f"{ns.schema}_rows"
            listener = await psycopg.AsyncConnection.connect(
                ns.services.database_url, autocommit=True
            )
            async with listener:
                await _install_notify(ns.schema, listener, channel)
                await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                committed: dict[str, float] = {}
                arrived = anyio.Event()
                nc = await ns.nats()
                try:
                    async with anyio.create_task_group() as tg:

                        async def listen() -> None:
                            nonlocal arrived
                            async for note in listener.notifies():
                                committed[note.payload] = time.monotonic()
                                arrived.set()
                                arrived = anyio.Event()

                        tg.start_soon(listen)
                        samples: list[float] = []
                        meter = CpuMeter({})
                        for i in range(WARMUP + count):
                            if i == WARMUP:  # the pool has its connections by now
                                meter = CpuMeter(
                                    {
                                        "daemon": [daemon.pid],
                                        "mock": [ctx.mock.pid],
                                        "bench": [os.getpid()],
                                        "nats": find_pids("nats-server"),
                                        "postgres": find_pids("postgres"),
                                    }
                                )
                                meter.start()
                            started = time.monotonic()
                            run_id = await trigger(nc, ns.prefix, "one")
                            with anyio.fail_after(60):
                                while run_id not in committed:
                                    await arrived.wait()
                            if i >= WARMUP:
                                samples.append((committed[run_id] - started) * 1000)
                        meter.stop()
                        tg.cancel_scope.cancel()
                finally:
                    await nc.close()
    return samples, meter


async def _install_notify(schema: str, conn: psycopg.AsyncConnection[Any], channel: str) -> None:
    ident = sql.Identifier(schema)
    await conn.execute(
        sql.SQL(
            "CREATE FUNCTION {}.bench_notify() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_notify({}, NEW.run_id); RETURN NEW; END $$"
        ).format(ident, sql.Literal(channel))
    )
    await conn.execute(
        sql.SQL(
            "CREATE TRIGGER bench_notify AFTER INSERT ON {}.collected_data"
            " FOR EACH ROW EXECUTE FUNCTION {}.bench_notify()"
        ).format(ident, ident)
    )
