"""argv → settings → run / migrate / check-config, and client commands for a running daemon.

Exit codes: 0 ok; 1 the daemon answered with an error, or a run failed; 2 usage or
configuration error; 3 the daemon (or its NATS) cannot be reached; 4 degraded (``health``).
Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from daemon import __version__
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
        epilog="Exit codes: 0 ok, 1 failed, 2 usage/config error, 3 unreachable, 4 degraded.",
    )
    parser.add_argument("--version", action="version", version=f"coleta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        return p

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            metavar="FILE",
            default=None,
            help="TOML config file (default: $COLETA_CONFIG, or the EXTERNAL_API_* variables)",
        )

    config_arg(add("run", "run the daemon until SIGTERM/SIGINT"))
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

    client("status", "status of the daemon and its sources")
    client("health", "exit 0 when healthy, 4 when degraded")
    runs = client("runs", "recent runs, newest first")
    runs.add_argument("source", nargs="?", help="only this source's runs")
    runs.add_argument("--limit", "-n", type=int, default=20)
    trigger = client("trigger", "queue a run of SOURCE now")
    trigger.add_argument("source")
    trigger.add_argument("--at", metavar="TIME", help="the slot (ISO 8601 with offset) to run")
    return parser


def _error(message: str) -> None:
    sys.stderr.write(f"coleta: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            settings = load_settings(args.file, env={})
            names = ", ".join(s.name for s in settings.sources) or "no sources"
            sys.stdout.write(f"{args.file}: ok ({len(settings.sources)} sources: {names})\n")
            return EXIT_OK
        if args.command in ("run", "migrate"):
            settings = load_settings(args.config)
            return anyio.run(_RUNNERS[args.command], settings, backend="asyncio")
        return anyio.run(_client, args, backend="asyncio")
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except ColetaError as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE if exc.code in ("transient", "store_unavailable") else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


async def _run(settings: Settings) -> int:
    from daemon.app import run

    return await run(settings)


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


_RUNNERS = {"run": _run, "migrate": _migrate}


def _client_server(args: argparse.Namespace) -> tuple[str, str]:
    """The NATS URL and bus prefix of the daemon to talk to."""
    from daemon.embedded import read_state_urls

    prefix = os.environ.get("COLETA_BUS_PREFIX", "coleta")
    state_dir = os.environ.get("COLETA_STATE_DIR", ".coleta")
    configured: str | None = None
    if args.config or os.environ.get("COLETA_CONFIG") or os.environ.get("EXTERNAL_API_URL"):
        settings = load_settings(args.config)
        prefix, state_dir, configured = settings.bus_prefix, settings.state_dir, settings.nats_url
    url = (
        args.server
        or os.environ.get("NATS_URL")
        or configured
        or read_state_urls(Path(state_dir)).nats_url
        or "nats://127.0.0.1:4222"
    )
    return url, prefix


async def _client(args: argparse.Namespace) -> int:
    import nats
    import nats.errors

    url, prefix = _client_server(args)

    async def quiet(exc: Exception) -> None:
        """nats-py prints every connection error with a traceback unless told otherwise."""

    try:
        with anyio.fail_after(args.timeout):
            # allow_reconnect=False makes nats-py retry a refused first connect forever.
            nc = await nats.connect(
                url,
                connect_timeout=2,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
            )
    except TimeoutError:
        _error(f"cannot reach NATS at {url}: no answer within {args.timeout:g} s")
        return EXIT_UNREACHABLE
    except Exception as exc:  # nats-py raises several unrelated types for "cannot connect"
        _error(f"cannot reach NATS at {url}: {exc or type(exc).__name__}")
        return EXIT_UNREACHABLE
    try:
        body: dict[str, Any] = {}
        if args.command == "runs":
            body = {"limit": args.limit} | ({"source": args.source} if args.source else {})
        elif args.command == "trigger":
            body = {"source": args.source} | ({"scheduled_for": args.at} if args.at else {})
        try:
            msg = await nc.request(
                f"{prefix}.{args.command}", msgspec.json.encode(body), timeout=args.timeout
            )
        except nats.errors.NoRespondersError:
            _error(f"no coleta daemon answers on {prefix}.{args.command} at {url}")
            return EXIT_UNREACHABLE
        except nats.errors.TimeoutError:
            _error(f"no reply from the daemon within {args.timeout:g} s ({url})")
            return EXIT_UNREACHABLE
    finally:
        await nc.close()
    headers = msg.headers or {}
    reply = msgspec.json.decode(msg.data) if msg.data else {}
    if "Nats-Service-Error" in headers:
        _error(headers["Nats-Service-Error"])
        return EXIT_FAILED
    if args.json:
        sys.stdout.write(msgspec.json.format(msg.data, indent=2).decode() + "\n")
    else:
        sys.stdout.write(_render(args.command, reply))
    if args.command == "health" and reply.get("status") != "ok":
        return EXIT_DEGRADED
    return EXIT_OK


def _render(command: str, reply: dict[str, Any]) -> str:
    """A short human-readable view of a reply."""
    lines: list[str] = []
    if command == "health":
        lines.append(
            reply.get("status", "?") + (f": {reply['reason']}" if reply.get("reason") else "")
        )
    elif command == "trigger":
        lines.append(f"queued {reply['run_id']} for {reply['scheduled_for']}")
    elif command == "runs":
        lines.append(f"{'RUN':44} {'STATUS':9} {'ROWS':>5} {'HTTP':>4}  TRACE")
        for run in reply.get("runs", []):
            lines.append(
                f"{run['run_id']:44} {run['status']:9} {run['rows']:>5}"
                f" {run.get('http_status') or '':>4}  {run.get('trace_id') or ''}"
            )
    elif command == "status":
        lines.append(
            f"coleta {reply['version']}  up {reply['uptime_s']:.0f} s  "
            f"bus {'ok' if reply['bus']['ok'] else reply['bus']['detail']}  "
            f"database {'ok' if reply['database']['ok'] else reply['database']['detail']}"
        )
        lines.append(f"{'SOURCE':20} {'SCHEDULE':16} {'NEXT RUN':26} {'LAST':8} {'ROWS':>6} FAILS")
        for src in reply.get("sources", []):
            last = src.get("last_run") or {}
            lines.append(
                f"{src['name']:20} {src['schedule']:16} {src.get('next_run') or '-':26}"
                f" {last.get('status', '-'):8} {src['rows']:>6} {src['consecutive_failures']}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
