"""Latency of one run: trigger request sent → its row committed in PostgreSQL.

A trigger on ``collected_data`` (added to the run's own schema after the daemon migrated it)
sends ``NOTIFY`` with the run id; PostgreSQL delivers a notification only after the commit, so
its arrival is "row committed". Runs are sequential (one in flight), the first few are warm-up,
and every interval is taken with ``time.monotonic()``.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
from psycopg import sql

from bench._infra import daemon_settings, namespace, running_daemon
from bench._report import Measure, Result, percentile
from bench.scenarios._common import Context, single_page_source, trigger

__all__ = ["run"]

WARMUP = 10


async def run(ctx: Context) -> Result:
    count = 50 if ctx.quick else 200
    result = Result("latency", f"3. Latency: one-page run, trigger -> row committed ({count} runs)")
    p50 = result.add(Measure("p50", "ms", target=("<", 20), digits=1))
    p99 = result.add(Measure("p99", "ms", target=("<", 100), digits=1))
    worst = result.add(Measure("max", "ms", digits=1))
    for _ in range(ctx.runs):
        samples = await _one_run(ctx, count)
        p50.values.append(percentile(samples, 50))
        p99.values.append(percentile(samples, 99))
        worst.values.append(max(samples))
    result.notes += [
        f"{WARMUP} warm-up runs first, not counted; one run in flight at a time; ~20 KB page.",
        "measured from just before the NATS trigger request to the NOTIFY of an AFTER INSERT"
        " trigger on collected_data arriving (PostgreSQL sends it after the commit).",
    ]
    return result


async def _one_run(ctx: Context, count: int) -> list[float]:
    async with namespace(ctx.services, "lat") as ns:
        config = daemon_settings(ns, [single_page_source(ctx.mock, "one")])
        async with running_daemon(config):
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
                        for i in range(WARMUP + count):
                            started = time.monotonic()
                            run_id = await trigger(nc, ns.prefix, "one")
                            with anyio.fail_after(60):
                                while run_id not in committed:
                                    await arrived.wait()
                            if i >= WARMUP:
                                samples.append((committed[run_id] - started) * 1000)
                        tg.cancel_scope.cancel()
                finally:
                    await nc.close()
    return samples


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
