"""The client commands: status, runs, health, trigger (and follow), backfill (and follow).

Lists the daemon sends in pages (status, runs) are followed to their end.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

from contracts import (
    BackfillReply,
    BackfillRequest,
    HealthReply,
    RunInfo,
    RunProgressReply,
    RunProgressRequest,
    RunsReply,
    RunsRequest,
    StatusReply,
    StatusRequest,
    TriggerReply,
    TriggerRequest,
    UtcDatetime,
)
from daemon.cli._client import EXIT_FAILED, EXIT_USAGE, ClientFailure, Request
from daemon.cli._render import (
    iso,
    progress_line,
    render_backfill_bar,
    render_runs,
    render_status,
    when,
)

__all__ = ["COMMANDS", "EXIT_DEGRADED", "EXIT_OK"]

EXIT_OK = 0
EXIT_DEGRADED = 4


def _print_json(reply: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(reply), indent=2).decode() + "\n")


async def _cmd_health(args: argparse.Namespace, request: Request) -> int:
    reply = await request("health", None, HealthReply)
    if args.json:
        _print_json(reply)
    else:
        reason = f": {reply.reason}" if reply.reason else ""
        sys.stdout.write(f"{reply.status}{reason}\n")
    failing = [name for name, check in reply.checks.items() if not check.ok]
    if args.ignore_sources and reply.status != "ok" and failing == ["sources"]:
        return EXIT_OK
    return EXIT_OK if reply.status == "ok" else EXIT_DEGRADED


#: Pages followed at most; a page that does not move the cursor ends the list too.
_MAX_PAGES = 10_000


async def _status_pages(request: Request, source: str | None) -> StatusReply:
    """Every page of ``status``, as one reply (``next`` null)."""
    asked = StatusRequest(source=source)
    first = reply = await request("status", asked, StatusReply)
    sources = list(first.sources)
    for _ in range(_MAX_PAGES):
        if reply.next is None or not reply.sources or reply.next == asked.after:
            break
        asked = msgspec.structs.replace(asked, after=reply.next)
        reply = await request("status", asked, StatusReply)
        sources.extend(reply.sources)
    return msgspec.structs.replace(first, sources=sources, next=None)


async def _cmd_status(args: argparse.Namespace, request: Request) -> int:
    reply = await _status_pages(request, args.source)
    if args.source is not None:  # a daemon older than the source filter sends them all
        names = [src.name for src in reply.sources]
        if args.source not in names:
            known = ", ".join(names) or "none"
            message = f"unknown source {args.source!r} (configured: {known})"
            raise ClientFailure(message, EXIT_FAILED)
        reply = msgspec.structs.replace(
            reply, sources=[src for src in reply.sources if src.name == args.source]
        )
    if args.json:
        _print_json(reply)
    else:
        sys.stdout.write(render_status(reply, datetime.now(UTC).date()))
    return EXIT_OK


#: Most runs one ``runs`` request asks for (the contract's limit).
_RUNS_PER_REQUEST = 1000


async def _runs_pages(request: Request, source: str | None, limit: int) -> RunsReply:
    """The newest ``limit`` runs, page after page; ``next`` says whether more remain."""
    runs: list[RunInfo] = []
    asked = RunsRequest(source=source)
    reply = RunsReply(runs=[])
    for _ in range(_MAX_PAGES):
        want = min(limit - len(runs), _RUNS_PER_REQUEST)  # below 1: the daemon says why
        asked = msgspec.structs.replace(asked, limit=want)
        reply = await request("runs", asked, RunsReply)
        runs.extend(reply.runs)
        if reply.next is None or not reply.runs or len(runs) >= limit or reply.next == asked.after:
            break
        asked = msgspec.structs.replace(asked, after=reply.next)
    return RunsReply(runs=runs[:limit], next=reply.next)


async def _cmd_runs(args: argparse.Namespace, request: Request) -> int:
    reply = await _runs_pages(request, args.source, args.limit)
    if args.json:
        _print_json(reply)
    else:
        sys.stdout.write(render_runs(reply.runs))
    return EXIT_OK


#: Run statuses after which a run changes no more.
_FINAL = {"stored": EXIT_OK, "unchanged": EXIT_OK, "failed": EXIT_FAILED, "missed": EXIT_FAILED}


async def _cmd_trigger(args: argparse.Namespace, request: Request) -> int:
    scheduled_for = None
    if args.at:
        try:
            scheduled_for = msgspec.convert(args.at, UtcDatetime)
        except msgspec.ValidationError as exc:
            raise ClientFailure(f"--at: {args.at!r}: {exc}", EXIT_USAGE) from None
    asked = TriggerRequest(source=args.source, scheduled_for=scheduled_for)
    reply = await request("trigger", asked, TriggerReply)
    if not args.wait:
        if args.json:
            _print_json(reply)
        else:
            sys.stdout.write(f"queued {reply.run_id} for {iso(reply.scheduled_for)}\n")
        return EXIT_OK
    run_id = reply.run_id
    if not args.json:
        sys.stdout.write(f"queued {run_id} for {iso(reply.scheduled_for)}\n")
        sys.stdout.flush()
    seen: tuple[str, int] | None = None
    run: RunInfo | None = None
    with anyio.move_on_after(args.wait_timeout):
        while True:
            runs = await request("runs", RunsRequest(source=args.source, limit=100), RunsReply)
            run = next((r for r in runs.runs if r.run_id == run_id), None)
            if run is not None:
                state = (run.status, run.attempts)
                if state != seen and not args.json:
                    sys.stdout.write(progress_line(run))
                    sys.stdout.flush()
                seen = state
                if run.status in _FINAL:
                    break
            await anyio.sleep(_POLL_S)
    if run is None or run.status not in _FINAL:
        status = run.status if run is not None else "not recorded yet"
        message = f"run {run_id} still {status} after {args.wait_timeout:g} s"
        raise ClientFailure(message, EXIT_FAILED)
    if args.json:
        _print_json(run)
    return _FINAL[run.status]


#: How often ``trigger --wait`` asks for the run's state.
_POLL_S = 0.3


async def _cmd_backfill(args: argparse.Namespace, request: Request) -> int:
    asked = BackfillRequest(source=args.source, start=args.start, end=args.end, force=args.force)
    reply = await request("backfill", asked, BackfillReply)
    run_ids = reply.run_ids
    if not args.json:
        sys.stdout.write(
            f"backfill {reply.source} {when(reply.start)} .. {when(reply.end)} UTC:"
            f" {reply.slots} slots, {reply.queued} queued,"
            f" {reply.skipped} skipped (already stored or running)\n"
        )
        sys.stdout.flush()
    if args.no_wait or not run_ids:
        if args.json:
            _print_json(reply)
        return EXIT_OK
    counts: dict[str, int] = {}
    shown = ""
    live = sys.stderr.isatty()
    finished = False
    with anyio.move_on_after(args.wait_timeout if args.wait_timeout else float("inf")):
        while True:
            asked_progress = RunProgressRequest(run_ids=run_ids)
            progress = await request("backfill.progress", asked_progress, RunProgressReply)
            counts = progress.counts
            line = render_backfill_bar(counts, len(run_ids))
            if line != shown and not args.json:
                sys.stderr.write(("\r" if live else "") + line + ("" if live else "\n"))
                sys.stderr.flush()
                shown = line
            if sum(counts.get(status, 0) for status in _FINAL) >= len(run_ids):
                finished = True
                break
            await anyio.sleep(_BACKFILL_POLL_S)
    if live and shown:
        sys.stderr.write("\n")
    stored = counts.get("stored", 0) + counts.get("unchanged", 0)
    failed = counts.get("failed", 0) + counts.get("missed", 0)
    if args.json:
        _print_json(msgspec.to_builtins(reply) | {"counts": counts, "finished": finished})
    else:
        sys.stdout.write(
            f"{stored} stored, {failed} failed, {reply.skipped} skipped"
            + ("" if finished else f", {len(run_ids) - stored - failed} still running")
            + "\n"
        )
    if not finished:
        raise ClientFailure(
            f"{len(run_ids) - stored - failed} runs still unfinished after"
            f" {args.wait_timeout:g} s (they go on; see coleta runs {args.source})",
            EXIT_FAILED,
        )
    return EXIT_FAILED if failed else EXIT_OK


#: How often ``backfill`` asks how far its runs are.
_BACKFILL_POLL_S = 0.5


COMMANDS: dict[str, Callable[[argparse.Namespace, Request], Awaitable[int]]] = {
    "health": _cmd_health,
    "status": _cmd_status,
    "runs": _cmd_runs,
    "trigger": _cmd_trigger,
    "backfill": _cmd_backfill,
}
