"""``python -m bench [--quick] [--runs N] [--profile] [--workers N,…] [SCENARIO…]``: run,
print, write results.

Scenarios: throughput (with the COPY ceiling and the peer), latency, scheduler, memory; none
named means all. Tables go to stdout and, with the machine and versions, to
``bench/results/latest.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import nats
import psycopg

from bench._infra import Services, mock_api, open_services
from bench._report import Result, machine, package_versions, render_markdown, render_text
from bench.scenarios import fanout, latency, memory, scheduler, status, throughput
from bench.scenarios._common import Context

Scenario = Callable[[Context], Awaitable[Result]]

SCENARIOS: dict[str, Scenario] = {
    "throughput": throughput.run,
    "latency": latency.run,
    "scheduler": scheduler.run,
    "memory": memory.run,
    "fanout": fanout.run,
    "status": status.run,
}
ALIASES = {"copy": "throughput", "peer": "throughput"}
RESULTS_DIR = Path(__file__).parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 1 run each, smaller sizes"
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (default 3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run the throughput daemon once under cProfile (not counted)",
    )
    parser.add_argument(
        "--workers",
        type=_counts,
        default=(1,),
        metavar="N,…",
        help="throughput and fanout: measure coleta with each of these `coleta run --workers`"
        " counts, in the same run as their COPY and straightforward comparisons (default 1)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.md")
    return parser


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts like 1,2,4") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts like 1,2,4")
    return counts


async def _versions(services: Services) -> dict[str, str]:
    found = package_versions()
    nc = await nats.connect(services.nats_url, connect_timeout=5)
    try:
        v = nc.connected_server_version
        found["nats-server"] = f"{v.major}.{v.minor}.{v.patch}"
    finally:
        await nc.close()
    async with await psycopg.AsyncConnection.connect(services.database_url) as conn:
        cur = await conn.execute("SHOW server_version")
        row = await cur.fetchone()
        found["postgresql"] = str(row[0]) if row else "?"
    return found


def _header(title: str, facts: dict[str, str]) -> list[str]:
    return [f"{title}: " + ", ".join(f"{k} {v}" for k, v in facts.items())]


async def _main(args: argparse.Namespace, names: list[str]) -> int:
    runs = args.runs or (1 if args.quick else 3)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    machine_facts = machine()
    with tempfile.TemporaryDirectory(prefix="coleta-bench-servers-") as state:
        async with open_services(Path(state)) as services:
            versions = await _versions(services)
            where = {
                "nats": f"{services.nats_url} ({services.nats_from})",
                "postgres": f"{services.database_url} ({services.database_from})",
            }
            print("\n".join(_header("machine", machine_facts)))
            print("\n".join(_header("versions", versions)))
            print("\n".join(_header("services", where)), flush=True)
            results: list[Result] = []
            with mock_api() as api:
                ctx = Context(
                    services=services,
                    mock=api,
                    quick=args.quick,
                    runs=runs,
                    results_dir=out.parent,
                    profile=args.profile,
                    workers=args.workers,
                )
                for name in names:
                    t0 = time.monotonic()
                    print(f"\n... {name}", flush=True)
                    result = await SCENARIOS[name](ctx)
                    print(render_text(result))
                    print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
                    results.append(result)
                    _write(out, args, runs, machine_facts, versions, where, results)
    print(f"\nwrote {out} in {time.monotonic() - started:.0f} s")
    return 0


def _write(
    out: Path,
    args: argparse.Namespace,
    runs: int,
    machine_facts: dict[str, str],
    versions: dict[str, str],
    where: dict[str, str],
    results: list[Result],
) -> None:
    mode = "quick (smoke check, smaller sizes)" if args.quick else "full"
    lines = [
        "# coleta benchmark results",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {mode}, {runs} run(s) per measurement;"
        " each number is the median with min-max over the runs.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine_facts.items()),
        "",
        "| versions | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in versions.items()),
        "",
        *(f"- {k}: {v}" for k, v in where.items()),
        "",
    ]
    for result in results:
        lines += [render_markdown(result), ""]
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names: list[str] = []
    for name in args.scenarios or list(SCENARIOS):
        name = ALIASES.get(name, name)
        if name not in SCENARIOS:
            _parser().error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        if name not in names:
            names.append(name)
    try:
        return anyio.run(_main, args, names, backend="asyncio")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
