"""argv → settings → run / migrate / check-config, and client commands for a running daemon.

Commands::

    coleta run [--config FILE] [--role ticker,fetcher,writer,service]
    coleta migrate [--config FILE]
    coleta check-config FILE
    coleta status [SOURCE] [--json]          sources, next/last run, a 30-day strip
    coleta runs [SOURCE] [--limit N] [--json]
    coleta trigger SOURCE [--at TIME] [--wait [--wait-timeout S]] [--json]
    coleta health [--json]
    coleta backfill SOURCE --from DATE --to DATE [--force] [--no-wait] [--json]

Exit codes:

- 0 ok (``trigger --wait``: the run was stored; ``backfill``: no run failed);
- 1 the daemon answered with an error (unknown source, bad request), or the run
  ``trigger --wait`` followed failed, was missed, or did not finish within ``--wait-timeout``
  (``backfill``: a run failed, or they did not all finish within ``--wait-timeout``);
- 2 usage or configuration error;
- 3 the daemon (or its NATS) cannot be reached, or does not answer in time;
- 4 degraded (``health``: the daemon answers but its bus or database does not);
- 130 interrupted (Ctrl-C).

Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec

from daemon import __version__
from daemon._history import STRIP_DAYS
from daemon.errors import ColetaError, ConfigError
from daemon.settings import Settings, load_settings

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DEGRADED = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coleta",
        description="Collect HTTP APIs on a schedule into PostgreSQL, through NATS JetStream.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"coleta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return p

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            metavar="FILE",
            default=None,
            help="TOML config file (default: $COLETA_CONFIG, or the EXTERNAL_API_* variables)",
        )

    run = add("run", "run the daemon until SIGTERM/SIGINT; SIGHUP reloads the config")
    config_arg(run)
    run.add_argument(
        "--role",
        metavar="ROLES",
        default=",".join(ROLE_NAMES),
        help="comma-separated stages to run: ticker (with catch-up), fetcher, writer (with"
        " retention), service; default: all",
    )
    config_arg(add("migrate", "apply database migrations and exit"))
    check = add("check-config", "validate a config file and exit (non-zero when invalid)")
    check.add_argument("file", metavar="FILE")

    def client(name: str, help_: str) -> argparse.ArgumentParser:
        p = add(name, help_)
        config_arg(p)
        p.add_argument("--server", "-s", metavar="URL", help="NATS URL of the daemon's bus")
        p.add_argument("--json", action="store_true", help="print the raw JSON reply")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
        return p

    status = client("status", "status of the daemon and its sources, with a 30-day strip")
    status.add_argument("source", nargs="?", help="only this source")
    client("health", "exit 0 when healthy, 4 when degraded")
    runs = client("runs", "recent runs, newest first")
    runs.add_argument("source", nargs="?", help="only this source's runs")
    runs.add_argument("--limit", "-n", type=int, default=20)
    trigger = client("trigger", "queue a run of SOURCE now")
    trigger.add_argument("source")
    trigger.add_argument("--at", metavar="TIME", help="the slot (ISO 8601 with offset) to run")
    trigger.add_argument(
        "--wait", action="store_true", help="follow the run to its end; exit 1 if it failed"
    )
    trigger.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="with --wait: give up (exit 1) after this many seconds (default 600)",
    )
    backfill = client(
        "backfill",
        "queue one run per scheduled slot of SOURCE from --from to --to (inclusive), oldest"
        " first, and follow them with a progress bar",
    )
    backfill.add_argument("source")
    backfill.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="DATE",
        help="first day (YYYY-MM-DD, in the source's timezone) or ISO 8601 datetime",
    )
    backfill.add_argument(
        "--to",
        dest="end",
        required=True,
        metavar="DATE",
        help="last day, included whole (YYYY-MM-DD), or ISO 8601 datetime",
    )
    backfill.add_argument(
        "--force", action="store_true", help="run slots already stored again (new run ids)"
    )
    backfill.add_argument("--no-wait", action="store_true", help="queue the runs and exit")
    backfill.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up following (exit 1) after this many seconds; the runs go on",
    )
    return parser


_EXIT_CODES = """exit codes:
  0    ok (trigger --wait: the run was stored)
  1    the daemon answered with an error (e.g. unknown source), or the followed run failed
  2    usage or configuration error
  3    the daemon or its NATS cannot be reached
  4    degraded (health)
  130  interrupted"""

#: The roles of ``coleta run --role`` (kept here so ``--help`` needs no daemon import).
ROLE_NAMES = ("ticker", "fetcher", "writer", "service")


def _error(message: str) -> None:
    sys.stderr.write(f"coleta: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            settings = load_settings(args.file, env={}, secret_env=os.environ)
            names = ", ".join(s.name for s in settings.sources) or "no sources"
            sys.stdout.write(f"{args.file}: ok ({len(settings.sources)} sources: {names})\n")
            return EXIT_OK
        if args.command == "run":
            roles = _roles(args.role)
            settings = load_settings(args.config)
            return anyio.run(_run, settings, args.config, roles, backend="asyncio")
        if args.command == "migrate":
            settings = load_settings(args.config)
            return anyio.run(_migrate, settings, backend="asyncio")
        return anyio.run(_client, args, backend="asyncio")
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except ColetaError as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE if exc.code in ("transient", "store_unavailable") else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _roles(text: str) -> frozenset[str]:
    roles = frozenset(role.strip() for role in text.split(",") if role.strip())
    unknown = sorted(roles - set(ROLE_NAMES))
    if unknown or not roles:
        what = f"unknown role {unknown[0]!r}" if unknown else "no role given"
        raise ConfigError(f"--role: {what} (roles: {', '.join(ROLE_NAMES)})")
    return roles


async def _run(settings: Settings, config: str | None, roles: frozenset[str]) -> int:
    from daemon.app import run

    return await run(settings, config=config, roles=roles)


async def _migrate(settings: Settings) -> int:
    from daemon._db import Database
    from daemon._logging import setup_logging
    from daemon.app import open_infrastructure

    setup_logging(settings.log_level)
    async with (
        open_infrastructure(settings) as infra,
        Database.open(infra.database_url, settings.database_schema),
    ):
        sys.stdout.write(f"migrations applied to schema {settings.database_schema}\n")
    return EXIT_OK


def _client_server(args: argparse.Namespace) -> tuple[str, str]:
    """The NATS URL and bus prefix of the daemon to talk to.

    Only ``nats_url``, ``bus_prefix`` and ``state_dir`` are read from the config, without
    validating the rest: a client must still reach a daemon whose file is being edited, and
    needs none of its secrets.
    """
    from daemon.embedded import read_state_urls

    data: dict[str, Any] = {}
    path = args.config or os.environ.get("COLETA_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
    prefix = os.environ.get("COLETA_BUS_PREFIX") or str(data.get("bus_prefix") or "coleta")
    state_dir = os.environ.get("COLETA_STATE_DIR") or str(data.get("state_dir") or ".coleta")
    configured = data.get("nats_url") if isinstance(data.get("nats_url"), str) else None
    url = (
        args.server
        or os.environ.get("NATS_URL")
        or configured
        or read_state_urls(Path(state_dir)).nats_url
        or "nats://127.0.0.1:4222"
    )
    return url, prefix


class _Failed(Exception):
    """One line for stderr, and the exit code to leave with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def _client(args: argparse.Namespace) -> int:
    url, prefix = _client_server(args)
    try:
        async with _connect(url, args.timeout) as nc:

            async def request(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
                timeout_s = max(args.timeout, _SLOW_ENDPOINTS.get(endpoint, 0.0))
                return await _request(nc, url, f"{prefix}.{endpoint}", body, timeout_s)

            return await _COMMANDS[args.command](args, request)
    except _Failed as exc:
        _error(str(exc))
        return exc.code


Request = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


@contextlib.asynccontextmanager
async def _connect(url: str, timeout_s: float) -> AsyncIterator[Any]:
    import nats

    async def quiet(exc: Exception) -> None:
        """nats-py prints every connection error with a traceback unless told otherwise."""

    try:
        with anyio.fail_after(timeout_s):
            # allow_reconnect=False makes nats-py retry a refused first connect forever.
            nc = await nats.connect(
                [server.strip() for server in url.split(",")],
                connect_timeout=2,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
            )
    except TimeoutError:
        raise _Failed(
            f"cannot reach NATS at {url}: no answer within {timeout_s:g} s", EXIT_UNREACHABLE
        ) from None
    except Exception as exc:  # nats-py raises several unrelated types for "cannot connect"
        raise _Failed(
            f"cannot reach NATS at {url}: {exc or type(exc).__name__}", EXIT_UNREACHABLE
        ) from None
    try:
        yield nc
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()


async def _request(
    nc: Any, url: str, subject: str, body: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """The decoded reply; an error reply or no reply raises ``_Failed``."""
    import nats.errors

    try:
        msg = await nc.request(subject, msgspec.json.encode(body), timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise _Failed(f"no coleta daemon answers on {subject} at {url}", EXIT_UNREACHABLE) from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise _Failed(
            f"no reply from the daemon within {timeout_s:g} s ({url})", EXIT_UNREACHABLE
        ) from None
    headers = msg.headers or {}
    if "Nats-Service-Error" in headers:
        raise _Failed(headers["Nats-Service-Error"], EXIT_FAILED)
    reply: dict[str, Any] = msgspec.json.decode(msg.data) if msg.data else {}
    return reply


def _print_json(reply: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(reply), indent=2).decode() + "\n")


async def _cmd_health(args: argparse.Namespace, request: Request) -> int:
    reply = await request("health", {})
    if args.json:
        _print_json(reply)
    else:
        reason = f": {reply['reason']}" if reply.get("reason") else ""
        sys.stdout.write(f"{reply.get('status', '?')}{reason}\n")
    return EXIT_OK if reply.get("status") == "ok" else EXIT_DEGRADED


async def _cmd_status(args: argparse.Namespace, request: Request) -> int:
    reply = await request("status", {})
    if args.source is not None:
        names = [src["name"] for src in reply.get("sources", [])]
        if args.source not in names:
            known = ", ".join(names) or "none"
            raise _Failed(f"unknown source {args.source!r} (configured: {known})", EXIT_FAILED)
        reply["sources"] = [src for src in reply["sources"] if src["name"] == args.source]
    if args.json:
        _print_json(reply)
    else:
        sys.stdout.write(render_status(reply, datetime.now(UTC).date()))
    return EXIT_OK


async def _cmd_runs(args: argparse.Namespace, request: Request) -> int:
    body: dict[str, Any] = {"limit": args.limit}
    if args.source:
        body["source"] = args.source
    reply = await request("runs", body)
    if args.json:
        _print_json(reply)
    else:
        sys.stdout.write(render_runs(reply.get("runs", [])))
    return EXIT_OK


#: Run statuses after which a run changes no more.
_FINAL = {"stored": EXIT_OK, "unchanged": EXIT_OK, "failed": EXIT_FAILED, "missed": EXIT_FAILED}


async def _cmd_trigger(args: argparse.Namespace, request: Request) -> int:
    body: dict[str, Any] = {"source": args.source}
    if args.at:
        body["scheduled_for"] = args.at
    reply = await request("trigger", body)
    if not args.wait:
        if args.json:
            _print_json(reply)
        else:
            sys.stdout.write(f"queued {reply['run_id']} for {reply['scheduled_for']}\n")
        return EXIT_OK
    run_id = reply["run_id"]
    if not args.json:
        sys.stdout.write(f"queued {run_id} for {reply['scheduled_for']}\n")
        sys.stdout.flush()
    seen: tuple[str, int] | None = None
    run: dict[str, Any] | None = None
    with anyio.move_on_after(args.wait_timeout):
        while True:
            runs = await request("runs", {"source": args.source, "limit": 100})
            run = next((r for r in runs.get("runs", []) if r["run_id"] == run_id), None)
            if run is not None:
                state = (run["status"], run.get("attempts", 0))
                if state != seen and not args.json:
                    sys.stdout.write(_progress(run))
                    sys.stdout.flush()
                seen = state
                if run["status"] in _FINAL:
                    break
            await anyio.sleep(_POLL_S)
    if run is None or run["status"] not in _FINAL:
        status = run["status"] if run is not None else "not recorded yet"
        raise _Failed(f"run {run_id} still {status} after {args.wait_timeout:g} s", EXIT_FAILED)
    if args.json:
        _print_json(run)
    return _FINAL[run["status"]]


#: How often ``trigger --wait`` asks for the run's state.
_POLL_S = 0.3
#: Endpoints that may take long to answer (a backfill publishes up to 10,000 commands).
_SLOW_ENDPOINTS = {"backfill": 300.0}


async def _cmd_backfill(args: argparse.Namespace, request: Request) -> int:
    body: dict[str, Any] = {"source": args.source, "start": args.start, "end": args.end}
    if args.force:
        body["force"] = True
    reply = await request("backfill", body)
    run_ids: list[str] = reply.get("run_ids", [])
    if not args.json:
        sys.stdout.write(
            f"backfill {reply['source']} {_when(reply['start'])} .. {_when(reply['end'])} UTC:"
            f" {reply['slots']} slots, {reply['queued']} queued,"
            f" {reply['skipped']} skipped (already stored or running)\n"
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
            progress = await request("backfill.progress", {"run_ids": run_ids})
            counts = progress.get("counts", {})
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
        _print_json(reply | {"counts": counts, "finished": finished})
    else:
        sys.stdout.write(
            f"{stored} stored, {failed} failed, {reply['skipped']} skipped"
            + ("" if finished else f", {len(run_ids) - stored - failed} still running")
            + "\n"
        )
    if not finished:
        raise _Failed(
            f"{len(run_ids) - stored - failed} runs still unfinished after"
            f" {args.wait_timeout:g} s (they go on; see coleta runs {args.source})",
            EXIT_FAILED,
        )
    return EXIT_FAILED if failed else EXIT_OK


#: How often ``backfill`` asks how far its runs are.
_BACKFILL_POLL_S = 0.5


def render_backfill_bar(counts: dict[str, int], total: int, width: int = 20) -> str:
    """``[#####...............] 12/40 stored, 1 failed``: finished runs fill the bar."""
    stored = counts.get("stored", 0) + counts.get("unchanged", 0)
    failed = counts.get("failed", 0) + counts.get("missed", 0)
    filled = width * min(total, stored + failed) // max(1, total)
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {stored}/{total} stored, {failed} failed"


_COMMANDS: dict[str, Callable[[argparse.Namespace, Request], Awaitable[int]]] = {
    "health": _cmd_health,
    "status": _cmd_status,
    "runs": _cmd_runs,
    "trigger": _cmd_trigger,
    "backfill": _cmd_backfill,
}


def _progress(run: dict[str, Any]) -> str:
    status = run["status"]
    if status == "stored":
        took = _took(run)
        trace = f", trace {run['trace_id']}" if run.get("trace_id") else ""
        return f"stored: {run['rows']} rows, {run['pages']} pages{took}{trace}\n"
    if status == "failed":
        http = f" (HTTP {run['http_status']})" if run.get("http_status") else ""
        return f"failed after {run.get('attempts', 0)} attempts{http}: {run.get('error') or '?'}\n"
    if status == "fetching":
        return f"fetching (attempt {max(1, run.get('attempts', 0))})\n"
    return f"{status}\n"


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


def _when(text: str | None) -> str:
    """``2026-05-01T10:00:00Z`` → ``2026-05-01 10:00`` (UTC), ``-`` for none."""
    if not text:
        return "-"
    moment = datetime.fromisoformat(text).astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M")


def _took(run: dict[str, Any]) -> str:
    if not (run.get("started_at") and run.get("finished_at")):
        return ""
    seconds = (
        datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])
    ).total_seconds()
    return f" in {seconds:.1f} s"


def strip(days: list[dict[str, Any]], today: date, width: int = STRIP_DAYS) -> str:
    """One mark per UTC day, oldest first, ending today."""
    outcome = {day["day"]: day["outcome"] for day in days}
    cells = []
    for back in range(width - 1, -1, -1):
        day = (today - timedelta(days=back)).isoformat()
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


def render_status(reply: dict[str, Any], today: date) -> str:
    bus, database = reply["bus"], reply["database"]
    lines = [
        f"coleta {reply['version']}  up {reply['uptime_s']:.0f} s  "
        f"bus {'ok' if bus['ok'] else bus['detail']}  "
        f"database {'ok' if database['ok'] else database['detail']}"
    ]
    rows = []
    for src in reply.get("sources", []):
        last = src.get("last_run") or {}
        rows.append(
            [
                src["name"],
                src["schedule"] + ("" if src["timezone"] == "UTC" else f" ({src['timezone']})"),
                _when(src.get("next_run")),
                _when(last.get("scheduled_for")),
                last.get("status", "-"),
                str(src["rows"]),
                str(src["consecutive_failures"]),
                str(src.get("dead_letters", 0)),
                f"|{strip(src.get('days', []), today)}|",
            ]
        )
    header = ["SOURCE", "SCHEDULE", "NEXT RUN", "LAST RUN", "LAST", "ROWS", "FAILS", "DLQ"]
    header.append(f"LAST {STRIP_DAYS} DAYS")
    lines += _table(header, rows, right={5, 6, 7})
    lines.append(f"times in UTC; days: {_LEGEND}")
    return "\n".join(lines) + "\n"


def render_runs(runs: list[dict[str, Any]]) -> str:
    rows = [
        [
            run["run_id"],
            run["trigger"],
            _when(run["scheduled_for"]),
            run["status"],
            str(run["rows"]),
            str(run.get("http_status") or ""),
            _took(run).removeprefix(" in "),
            run.get("trace_id") or "",
            (run.get("error") or "")[:60],
        ]
        for run in runs
    ]
    header = ["RUN", "TRIGGER", "SCHEDULED", "STATUS", "ROWS", "HTTP", "TOOK", "TRACE", "ERROR"]
    return "\n".join(_table(header, rows, right={4, 5, 6})) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
