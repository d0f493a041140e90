"""A profiled daemon run: py-spy samples and ``_probe`` counters, summarised per run.

``sampling(pid, out)`` records the daemon with py-spy (``--nonblocking``: the process is never
paused, so the run keeps its pace) while the block runs; ``summary`` turns the samples and the
probe's counters into the figures of a one-page run: NATS messages sent and received by kind,
SQL statement executions by statement, spans by name and log lines by level — each per run —
and the daemon's CPU split by what it was doing. A sample counts for the innermost frame that
belongs to a known part (a library, or a stage of the daemon) — a socket write or read for the
part that asked for it (NATS client I/O is the NATS client's) — and one with none counts for
the event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["CATEGORIES", "cprofile_shares", "cpu_shares", "py_spy", "sampling", "summary"]

#: (category, substrings of a frame's file), the first match of the innermost frame wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("OTel spans", ("/opentelemetry/", "daemon/platform/spans.py", "daemon/platform/tracing.py")),
    (
        "HTTP client",
        (
            "/httpx/",
            "/httpcore/",
            "/aiohttp/",
            "/yarl/",
            "/multidict/",
            "daemon/fetcher/_transport.py",
            "daemon/fetcher/_send.py",
            "daemon/fetcher/_client.py",
            "daemon/fetcher/_request.py",
        ),
    ),
    ("NATS client (and its socket I/O)", ("/nats/",)),
    ("SQL (psycopg)", ("/psycopg/", "/psycopg_pool/", "daemon/platform/db.py")),
    ("cron", ("/croniter/", "/dateutil/", "daemon/schedule.py")),
    ("logging", ("/logging/", "daemon/platform/logs.py")),
    ("metrics", ("daemon/platform/metrics.py", "daemon/platform/meter.py")),
    ("leases + source state + deferrals", ("fetcher/_leases.py", "fetcher/_defer.py")),
    ("writer", ("daemon/writer/",)),
    ("fetcher (run loop, events, pages)", ("daemon/fetcher/",)),
    ("service (trigger requests)", ("daemon/service/",)),
    ("ticker (queue_run)", ("daemon/ticker/",)),
    ("bus (publish, consume)", ("daemon/platform/bus/", "daemon/platform/dead_letters.py")),
    ("contracts, ids, redaction", ("/contracts/", "daemon/ids.py", "daemon/platform/redact.py")),
    ("event loop + anyio", ("/asyncio/", "/anyio/", "/selectors.py")),
    ("the probe's own counting", ("bench/_probe.py",)),
]


#: A run's root span, ``<trigger> <source>``.
_ROOT = re.compile(r"^(manual|schedule|backfill|catchup) \S+$")

#: asyncio's socket transports and streams: the system calls of whoever uses them.
_SOCKET_IO = ("/asyncio/selector_events.py", "/asyncio/transports.py", "/asyncio/streams.py")


def py_spy() -> str | None:
    """The py-spy executable beside this Python, or on PATH; None when not installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _user_system_s(pid: int) -> tuple[float, float]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


@contextlib.contextmanager
def sampling(pid: int, out: Path, rate: int = 250) -> Iterator[dict[str, float]]:
    """py-spy samples of ``pid`` while the block runs, as raw collapsed stacks in ``out``;
    the dict yielded gets the process's user and system CPU seconds over the block."""
    used: dict[str, float] = {}
    exe = py_spy()
    if exe is None:
        with _cpu_split(pid, used):
            yield used
        return
    command = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking"]
    command += ["--full-filenames", "--format", "raw", "--output", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the window opens
    try:
        with _cpu_split(pid, used):
            yield used
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def _cpu_split(pid: int, used: dict[str, float]) -> Iterator[None]:
    user, system = _user_system_s(pid)
    try:
        yield
    finally:
        user2, system2 = _user_system_s(pid)
        used |= {"user_s": user2 - user, "system_s": system2 - system}


def cpu_shares(raw: Path) -> tuple[Counter[str], int]:
    """Samples per category from py-spy's raw output, and the total."""
    shares: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        shares[_category(stack.split(";"))] += count
    return shares, total


def cprofile_shares(path: Path) -> Counter[str]:
    """CPU seconds per category from a CPU-timed cProfile dump: each function's own time by
    its file, a built-in's (a socket send, msgspec, a regex) split among its callers."""
    stats: dict[tuple[str, int, str], Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    shares: Counter[str] = Counter()
    for (file, _, _), (_, _, own, _, callers) in stats.items():
        if file != "~":
            shares[_file_category(file)] += own
            continue
        edges = {caller: edge[2] for caller, edge in callers.items()}
        total = sum(edges.values())
        for (caller_file, _, _), edge_own in edges.items():
            share = own * edge_own / total if total else own / len(edges)
            shares[_file_category(caller_file) if caller_file != "~" else "builtins"] += share
    return shares


def _file_category(file: str) -> str:
    if any(needle in file for needle in _SOCKET_IO):
        return "asyncio socket I/O (NATS, HTTP)"
    for name, needles in CATEGORIES:
        if any(needle in file for needle in needles):
            return name
    return "other"


def _category(frames: list[str]) -> str:
    io = False
    for frame in reversed(frames):  # innermost last
        if any(needle in frame for needle in _SOCKET_IO):
            io = True  # a socket write or read: charged to whoever asked for it
            continue
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                if io and name == "event loop + anyio":
                    break
                return name
    return "event loop + anyio"


def summary(
    counts_path: Path,
    raw_path: Path | None,
    prof: Path | None,
    runs: int,
    cpu_ms_per_run: float,
    used: dict[str, float] | None = None,
) -> str:
    """The per-run figures of a profiled run, as Markdown."""
    counts: dict[str, dict[str, int]] = json.loads(counts_path.read_text())
    lines = [f"daemon CPU: {cpu_ms_per_run:.2f} ms/run (with the probe and py-spy attached)"]
    if used:
        user, system = used["user_s"] / runs * 1000, used["system_s"] / runs * 1000
        lines.append(f"of which user {user:.2f} ms/run, system (kernel) {system:.2f} ms/run")
    lines.append("")
    titles = {
        "nats_out": "NATS messages sent",
        "nats_in": "NATS messages received",
        "sql": "SQL statement executions",
        "spans": "spans started",
        "logs": "log records",
    }
    for key, title in titles.items():
        found: Counter[str] = Counter()
        for name, count in counts.get(key, {}).items():
            found[_ROOT.sub(r"\1 <source>", re.sub(r"^(\S+ )b\w+?\.", r"\1<prefix>.", name))] += (
                count
            )
        total = sum(found.values())
        lines += [f"| {title}: {total / runs:.2f} per run | per run |", "|---|---:|"]
        for name, count in sorted(found.items(), key=lambda kv: -kv[1]):
            if count / runs >= 0.005:
                lines.append(f"| `{name}` | {count / runs:.2f} |")
        lines.append("")
    if prof is not None and prof.exists():
        shares = cprofile_shares(prof)
        total = sum(shares.values())
        lines += [
            "CPU by part, from a second run under cProfile timed by CPU time (its overhead"
            " inflates the parts made of many small calls; ms/run scaled to the total above):",
            "",
            "| CPU share (cProfile, CPU time) | % | ms/run |",
            "|---|---:|---:|",
        ]
        for name, seconds in shares.most_common():
            share = seconds / max(total, 1e-9)
            lines.append(f"| {name} | {share * 100:.1f} | {share * cpu_ms_per_run:.2f} |")
        lines.append("")
    if raw_path is not None and raw_path.exists():
        shares, total = cpu_shares(raw_path)
        lines += [
            "Where the event loop's thread was, from py-spy samples (wall time: on a core, or"
            " ready and waiting for one — on a busy 2-core machine the waiting inflates whatever"
            " wakes another process, such as a socket write to nats-server):",
            "",
            f"| thread time ({total:,} samples) | % | ms/run |",
            "|---|---:|---:|",
        ]
        for name, count in shares.most_common():
            share = count / max(1, total)
            lines.append(f"| {name} | {share * 100:.1f} | {share * cpu_ms_per_run:.2f} |")
        lines.append("")
    return "\n".join(lines)
