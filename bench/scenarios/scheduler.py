"""Scheduler scale: many sources on one schedule, the real clock, a ticker-only daemon.

The daemon subprocess runs ``--role ticker`` with ``N`` sources that all fire each period
(full: 10,000 on ``* * * * *``; quick: 1,000 on ``*/10 * * * * *``, catch-up off). The
benchmark subscribes to ``<prefix>.collect.>`` on plain NATS and, for each command, takes
lateness = wall-clock arrival - the command's ``scheduled_for`` (the slot). Both clocks are this
machine's, so lateness covers everything from the slot to the command being on the bus — the
ticker's wake-up, planning and every publish before it — over two consecutive slot boundaries.

CPU is the daemon process's own (``/proc/<pid>/stat``): per tick, from half a second before the
boundary to the last command of the burst; idle, over the quiet part between the two bursts.
"""

from __future__ import annotations

import time
from datetime import datetime

import anyio
import msgspec
from nats.aio.msg import Msg

from bench._infra import daemon_settings, namespace, running_daemon
from bench._report import Measure, Result, percentile
from bench.scenarios._common import Context

__all__ = ["run"]

BOUNDARIES = 2


class _Command(msgspec.Struct):
    scheduled_for: datetime


_decode = msgspec.json.Decoder(_Command).decode


async def run(ctx: Context) -> Result:
    n, period, schedule = (1_000, 10, "*/10 * * * * *") if ctx.quick else (10_000, 60, "* * * * *")
    result = Result(
        "scheduler",
        f"4. Scheduler scale: {n:,} sources on '{schedule}', ticker only, {BOUNDARIES} boundaries",
    )
    startup = result.add(Measure("daemon start-up to ready", "s", digits=2))
    p50 = result.add(Measure("tick lateness p50", "ms", digits=1))
    p99 = result.add(Measure("tick lateness p99", "ms", target=("<", 100), digits=1))
    worst = result.add(Measure("tick lateness max (last command of the burst)", "ms", digits=1))
    tick_cpu = result.add(Measure("ticker CPU per boundary", "s", digits=3))
    per_tick = result.add(Measure("ticker CPU per tick", "us", digits=0))
    idle = result.add(
        Measure("idle CPU between boundaries", "% of a core", target=("<", 2.0), digits=2)
    )
    missing = result.add(Measure("commands missing after the burst window", "", digits=0))

    async with namespace(ctx.services, "sch") as ns:
        sources = [
            {
                "name": f"s{i:05d}",
                "url": ctx.mock.url("/pages"),
                "schedule": schedule,
                "catchup": "none",
            }
            for i in range(n)
        ]
        config = daemon_settings(ns, sources)
        nc = await ns.nats()
        arrivals: list[tuple[float, bytes]] = []

        async def on_command(msg: Msg) -> None:
            arrivals.append((time.time(), msg.data))

        sub = await nc.subscribe(f"{ns.prefix}.collect.>", cb=on_command)
        try:
            spawned = time.monotonic()
            async with running_daemon(config, roles="ticker") as daemon:
                startup.values.append(time.monotonic() - spawned)
                now = time.time()
                boundary = (int(now) // period + 1) * period
                if boundary - now < 1.0:
                    boundary += period  # too close: the ticker may be planning still
                idle_from: float | None = None
                idle_cpu = 0.0
                for _ in range(BOUNDARIES):
                    await _sleep_until(boundary - 0.5)
                    if idle_from is not None:
                        cpu_now = daemon.cpu_seconds()
                        window = time.time() - idle_from
                        idle.values.append((cpu_now - idle_cpu) / window * 100)
                    arrivals.clear()
                    cpu_before = daemon.cpu_seconds()
                    # The burst: until every command arrived, or most of the period passed.
                    deadline = boundary + period * 0.9
                    # The subscriber's callback fills ``arrivals``: poll its length.
                    while len(arrivals) < n and time.time() < deadline:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                    cpu_after = daemon.cpu_seconds()
                    got = list(arrivals)
                    missing.values.append(n - len(got))
                    lateness = [
                        (at - _decode(data).scheduled_for.timestamp()) * 1000 for at, data in got
                    ]
                    p50.values.append(percentile(lateness, 50))
                    p99.values.append(percentile(lateness, 99))
                    worst.values.append(max(lateness, default=float("nan")))
                    tick_cpu.values.append(cpu_after - cpu_before)
                    per_tick.values.append((cpu_after - cpu_before) / max(1, len(got)) * 1e6)
                    await anyio.sleep(1.0)
                    idle_from, idle_cpu = time.time(), daemon.cpu_seconds()
                    boundary += period
        finally:
            await sub.unsubscribe()
            await nc.close()
    result.notes += [
        "one daemon, two consecutive boundaries: min-max are across the boundaries; idle CPU"
        " is one window (from 1 s after the first burst to 0.5 s before the second).",
        "lateness = arrival on the bus (plain NATS subscriber) - the slot, wall clock;"
        " the daemon logs one tick.queued line per source per tick, included in its CPU.",
    ]
    return result


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await anyio.sleep(delay)
