"""The service at 10,000 sources: each page of ``coleta.status`` and ``coleta.runs``, and the
whole ``coleta status`` listing.

A daemon (service role only, no schedules firing) is given 10,000 sources whose last runs
failed with long errors (rows written straight into ``collection_runs``, as 10,000 runs of
history would leave them). Then: every page of ``coleta.status`` followed through ``next``, every
page of ``coleta.runs`` at its largest limit, each request timed; and ``coleta status`` as a
user runs it (a process: start-up, every page, rendering), timed whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from bench._infra import daemon_settings, namespace, running_daemon
from bench._report import Measure, Result
from bench.scenarios._common import NEVER, Context

__all__ = ["run"]

SOURCES = 10_000
ERROR = "HTTP 503 Service Unavailable from https://api.example.com/v1/items: " + "x" * 400


async def run(ctx: Context) -> Result:
    sources = 1_000 if ctx.quick else SOURCES
    result = Result("status", f"8. Service at {sources:,} sources: status and runs pages")
    status_p50 = result.add(Measure("coleta.status, one page, p50", "ms", digits=1))
    status_max = result.add(
        Measure("coleta.status, one page, max", "ms", target=("<", 200), digits=1)
    )
    status_pages = result.add(Measure("coleta.status pages for every source", "pages", digits=0))
    runs_max = result.add(
        Measure("coleta.runs (limit 1000), one page, max", "ms", target=("<", 200), digits=1)
    )
    cli = result.add(
        Measure(f"`coleta status` listing all {sources:,}", "s", target=("<", 2.0), digits=2)
    )
    for _ in range(ctx.runs):
        async with namespace(ctx.services, "st") as ns:
            config = daemon_settings(
                ns,
                [
                    {
                        "name": f"src{i:05d}",
                        "url": "http://127.0.0.1:9/x",
                        "schedule": NEVER,
                        "catchup": "none",
                    }
                    for i in range(sources)
                ],
            )
            async with running_daemon(config, roles="service,writer") as _daemon:
                await _history(ns, sources)
                nc = await ns.nats()
                try:
                    times, pages = await _follow(nc, f"{ns.prefix}.status", {})
                    status_p50.values.append(sorted(times)[len(times) // 2])
                    status_max.values.append(max(times))
                    status_pages.values.append(pages)
                    times, _ = await _follow(nc, f"{ns.prefix}.runs", {"limit": 1000}, most=10)
                    runs_max.values.append(max(times))
                finally:
                    await nc.close()
                env = dict(os.environ)
                env.update(NATS_URL=ns.services.nats_url, COLETA_BUS_PREFIX=ns.prefix)
                started = time.monotonic()
                done = await anyio.to_thread.run_sync(_cli_status, env)
                cli.values.append(time.monotonic() - started)
                listed = sum(1 for line in done.stdout.splitlines() if line.startswith("src"))
                if done.returncode != 0 or listed != sources:
                    raise RuntimeError(f"coleta status listed {listed}: {done.stderr[-500:]}")
    result.notes.append(
        "each source's last run failed with a 470-character error; the CLI is a fresh process"
        " (Python start-up and imports included)."
    )
    return result


def _cli_status(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _history(ns: Any, sources: int) -> None:
    conn = await ns.aconnect()
    async with conn:
        await conn.execute(
            "INSERT INTO collection_runs (run_id, source, trigger, scheduled_for, status,"
            " attempts, error_code, error, queued_at, finished_at)"
            " SELECT 'src' || lpad(i::text, 5, '0') || '@x', 'src' || lpad(i::text, 5, '0'),"
            " 'schedule', now() - interval '1 hour', 'failed', 3, 'http_status', %s,"
            " now() - interval '1 hour', now() - interval '59 minutes'"
            " FROM generate_series(0, %s - 1) AS i",
            (ERROR, sources),
        )


async def _follow(
    nc: Any, subject: str, body: dict[str, Any], *, most: int = 10_000
) -> tuple[list[float], int]:
    """Request every page (``after`` = the last ``next``); each request's time in ms."""
    times: list[float] = []
    after: str | None = None
    pages = 0
    while pages < most:
        request = body | ({"after": after} if after else {})
        started = time.perf_counter()
        reply = await nc.request(subject, msgspec.json.encode(request), timeout=10)
        times.append((time.perf_counter() - started) * 1000)
        if reply.headers and "Nats-Service-Error" in reply.headers:
            raise RuntimeError(f"{subject}: {reply.headers['Nats-Service-Error']}")
        pages += 1
        after = msgspec.json.decode(reply.data).get("next")
        if not after:
            break
    return times, pages
