"""What the CLI prints: tables of sources and runs, the 30-day strip, progress lines."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import msgspec

from contracts import STRIP_DAYS, DayMark, RunInfo, SourceStatus, StatusReply
from daemon.settings import format_duration

__all__ = [
    "MARKS",
    "iso",
    "progress_line",
    "render_backfill_bar",
    "render_runs",
    "render_status",
    "strip",
    "when",
]


def render_backfill_bar(counts: dict[str, int], total: int, width: int = 20) -> str:
    """``[#####...............] 12/40 stored, 1 failed``: finished runs fill the bar."""
    stored = counts.get("stored", 0) + counts.get("unchanged", 0)
    failed = counts.get("failed", 0) + counts.get("missed", 0)
    filled = width * min(total, stored + failed) // max(1, total)
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {stored}/{total} stored, {failed} failed"


def progress_line(run: RunInfo) -> str:
    if run.status == "stored":
        trace = f", trace {run.trace_id}" if run.trace_id else ""
        return f"stored: {run.rows} rows, {run.pages} pages{_took(run)}{trace}\n"
    if run.status == "failed":
        http = f" (HTTP {run.http_status})" if run.http_status else ""
        return f"failed after {run.attempts} attempts{http}: {run.error or '?'}\n"
    if run.status == "fetching":
        return f"fetching (attempt {max(1, run.attempts)})\n"
    return f"{run.status}\n"


# -- rendering -------------------------------------------------------------------------------


#: One mark per UTC day in ``coleta status``.
MARKS = {
    "stored": "█",
    "unchanged": "=",
    "running": "~",
    "failed": "x",
    "missed": "·",
}
_LEGEND = "  ".join(f"{mark} {name}" for name, mark in MARKS.items()) + "  (blank) no run"


def iso(moment: datetime) -> str:
    """As the wire has it: ``2026-05-01T10:00:00Z``."""
    return msgspec.json.encode(moment).decode().strip('"')


def when(moment: datetime | None) -> str:
    """``2026-05-01 10:00`` (UTC), ``-`` for none."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _took(run: RunInfo) -> str:
    if run.started_at is None or run.finished_at is None:
        return ""
    return f" in {(run.finished_at - run.started_at).total_seconds():.1f} s"


def strip(days: list[DayMark], today: date, width: int = STRIP_DAYS) -> str:
    """One mark per UTC day, oldest first, ending today."""
    outcome = {mark.day: mark.outcome for mark in days}
    cells = []
    for back in range(width - 1, -1, -1):
        day = today - timedelta(days=back)
        cells.append(MARKS.get(outcome.get(day, ""), " "))
    return "".join(cells)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    out = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _age(src: SourceStatus) -> str:
    """How long since the source's last stored run; ``!`` when that makes it late."""
    if src.freshness_age_s is None:
        return "-"
    return format_duration(src.freshness_age_s) + ("!" if src.late else "")


def render_status(reply: StatusReply, today: date) -> str:
    bus, database = reply.bus, reply.database
    late = sum(1 for src in reply.sources if src.late)
    failing = sum(1 for src in reply.sources if src.failing)
    alerts = [f"{n} {what}" for n, what in ((late, "late"), (failing, "failing")) if n]
    lines = [
        f"coleta {reply.version}  up {reply.uptime_s:.0f} s  "
        f"bus {'ok' if bus.ok else bus.detail}  "
        f"database {'ok' if database.ok else database.detail}"
        + (f"  sources {', '.join(alerts)}" if alerts else "")
    ]
    rows = []
    for src in reply.sources:
        last = src.last_run
        rows.append(
            [
                src.name,
                src.schedule + ("" if src.timezone == "UTC" else f" ({src.timezone})"),
                when(src.next_run),
                when(last.scheduled_for if last else None),
                last.status if last else "-",
                _age(src),
                str(src.rows),
                str(src.consecutive_failures) + ("!" if src.failing else ""),
                str(src.dead_letters),
                f"|{strip(src.days, today)}|",
            ]
        )
    header = ["SOURCE", "SCHEDULE", "NEXT RUN", "LAST RUN", "LAST", "AGE", "ROWS", "FAILS", "DLQ"]
    header.append(f"LAST {STRIP_DAYS} DAYS")
    lines += _table(header, rows, right={5, 6, 7, 8})
    lines.append(f"times in UTC; days: {_LEGEND}")
    lines.append(
        "AGE: since the last stored run; ! late (no stored run within the source's"
        " freshness_s) or failing (failures_before_degraded failed runs in a row)"
    )
    return "\n".join(lines) + "\n"


def render_runs(runs: list[RunInfo]) -> str:
    rows = [
        [
            run.run_id,
            run.trigger,
            when(run.scheduled_for),
            run.status,
            str(run.rows),
            str(run.http_status or ""),
            _took(run).removeprefix(" in "),
            run.trace_id or "",
            (run.error or "")[:60],
        ]
        for run in runs
    ]
    header = ["RUN", "TRIGGER", "SCHEDULED", "STATUS", "ROWS", "HTTP", "TOOK", "TRACE", "ERROR"]
    return "\n".join(_table(header, rows, right={4, 5, 6})) + "\n"
