"""Numbers → tables: medians with min-max, targets met or not, the machine and versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Measure", "Result", "machine", "percentile", "render_markdown", "render_text"]

PACKAGES = ("anyio", "nats-py", "httpx", "psycopg", "psycopg-pool", "msgspec", "croniter")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100), nearest rank on sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(slots=True)
class Measure:
    """One measured quantity over several runs, with an optional target."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    #: e.g. ``(">=", 0.7)``: met when the median compares so.
    target: tuple[str, float] | None = None
    note: str = ""
    #: Shown instead of numbers (``n/a (not implemented)``).
    missing: str | None = None
    digits: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.missing is not None or not self.values:
            return "not measured"
        op, bound = self.target
        met = self.median >= bound if op == ">=" else self.median < bound
        return "met" if met else "NOT met"

    def cells(self) -> list[str]:
        fmt = f"{{:,.{self.digits}f}}"
        if self.missing is not None or not self.values:
            number = spread = self.missing or "no data"
            spread = ""
        else:
            number = fmt.format(self.median)
            spread = (
                f"{fmt.format(min(self.values))} - {fmt.format(max(self.values))}"
                if len(self.values) > 1
                else "(1 run)"
            )
        target = f"{self.target[0]} {self.target[1]:g}" if self.target else ""
        return [self.name, number, spread, self.unit, target, self.verdict(), self.note]


@dataclass(slots=True)
class Result:
    """One scenario's table and what the reader needs to know about how it was measured."""

    scenario: str
    title: str
    measures: list[Measure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, measure: Measure) -> Measure:
        self.measures.append(measure)
        return measure


_HEADER = ["metric", "median", "min-max", "unit", "target", "verdict", "note"]


def _table_rows(result: Result) -> list[list[str]]:
    return [m.cells() for m in result.measures]


def render_text(result: Result) -> str:
    rows = [_HEADER, *_table_rows(result)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = [f"== {result.title} =="]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"  * {note}" for note in result.notes]
    return "\n".join(lines)


def render_markdown(result: Result) -> str:
    lines = [f"## {result.title}", "", "| " + " | ".join(_HEADER) + " |"]
    lines.append("|" + "---|" * len(_HEADER))
    for row in _table_rows(result):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    if result.notes:
        lines.append("")
        lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def machine() -> dict[str, str]:
    load = os.getloadavg()
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "memory": f"{_memory_gib():.1f} GiB",
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in load),
    }


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
