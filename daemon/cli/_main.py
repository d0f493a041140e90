"""argv → settings → run / migrate / check-config, and client commands for a running daemon.

Commands::

    coleta run [--config FILE] [--role ticker,fetcher,writer,service] [--workers N|auto]
    coleta migrate [--config FILE] [--grant-to ROLE]   needs only the database (DATABASE_URL)
    coleta check-config FILE
    coleta status [SOURCE] [--json]          sources, next/last run, a 30-day strip
    coleta runs [SOURCE] [--limit N] [--json]
    coleta trigger SOURCE [--at TIME] [--wait [--wait-timeout S]] [--json]
    coleta health [--ignore-sources] [--json]
    coleta backfill SOURCE --from DATE --to DATE [--force] [--no-wait] [--json]

Exit codes:

- 0 ok (``trigger --wait``: the run was stored; ``backfill``: no run failed);
- 1 the daemon answered with an error (unknown source, bad request), or the run
  ``trigger --wait`` followed failed, was missed, or did not finish within ``--wait-timeout``
  (``backfill``: a run failed, or they did not all finish within ``--wait-timeout``);
- 2 usage or configuration error;
- 3 the daemon (or its NATS) cannot be reached, or does not answer in time;
- 4 degraded (``health``: the daemon answers but its bus, database, a stream or consumer does
  not, or a source is late or failing; with ``--ignore-sources``, not for sources);
- 130 interrupted (Ctrl-C); 141 the reader of stdout went away (``coleta runs | head``), as
  a shell reports SIGPIPE, without a word.

Errors are one clear line on stderr, never a traceback. Replies are decoded with the
contracts; a list the daemon sends in pages (status, runs) is followed to its end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from daemon import __version__
from daemon.cli._client import ClientFailure, client_server, open_request
from daemon.cli._commands import COMMANDS, EXIT_OK
from daemon.cli._stdio import never_drop_output
from daemon.errors import EXIT_UNREACHABLE, ColetaError, FatalError, TransientError
from daemon.settings import (
    ROLES,
    Settings,
    load_settings,
    parse_roles,
    parse_settings,
    read_toml,
    with_workers,
)

__all__ = ["main"]

EXIT_FAILED = 1
#: What a shell reports for a command killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


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
        default=",".join(ROLES),
        help="comma-separated stages to run: ticker (with catch-up), fetcher, writer (with"
        " retention), service; default: all",
    )
    run.add_argument(
        "--workers",
        metavar="N",
        default=None,
        help="processes running the fetcher and the writer, this one included when it runs"
        " the fetcher; the others are started and supervised by this one; 'auto': one per"
        " core (default: the config's workers, $COLETA_WORKERS, or 1)",
    )
    # A worker started by ``--workers``: its index; its parent is on the other end of stdin.
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    migrate = add("migrate", "apply database migrations and exit")
    config_arg(migrate)
    migrate.add_argument(
        "--grant-to",
        metavar="ROLE",
        help="then grant ROLE the rights the daemon needs on the schema, and no DDL",
    )
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
    health = client("health", "exit 0 when healthy, 4 when degraded")
    health.add_argument(
        "--ignore-sources",
        action="store_true",
        help="exit 0 while the daemon and its bus and database are fine, even when sources are"
        " late or failing (a container's health check: an API that is down is no reason to"
        " restart coleta)",
    )
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
  130  interrupted
  141  stdout closed by its reader (| head)"""


def _error(message: str) -> None:
    sys.stderr.write(f"coleta: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    never_drop_output()
    args = _parser().parse_args(argv)
    running = False  # once `coleta run` has set up its JSON log, errors go there
    try:
        if args.command == "check-config":
            settings = load_settings(args.file, env={}, secret_env=os.environ)
            names = ", ".join(s.name for s in settings.sources) or "no sources"
            sys.stdout.write(f"{args.file}: ok ({len(settings.sources)} sources: {names})\n")
            return EXIT_OK
        if args.command == "run":
            roles = parse_roles(args.role)
            settings = load_settings(args.config)
            if args.workers is not None:
                settings = with_workers(settings, args.workers)
            running = True
            return anyio.run(
                _run,
                settings,
                args.config,
                roles,
                args.worker_index,
                args.workers,
                backend="asyncio",
            )
        if args.command == "migrate":
            settings = _database_settings(args.config)
            return anyio.run(_migrate, settings, args.grant_to, backend="asyncio")
        return anyio.run(_client, args, backend="asyncio")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`coleta runs | head`): nothing more to say, as other tools do.
        # stdout goes to /dev/null so the interpreter's own flush at exit cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (ColetaError, BaseExceptionGroup) as exc:
        error = _coleta_error(exc)
        if error is None:
            raise  # a bug: its traceback is the report
        code = _exit_code(error)
        if running:
            from daemon.platform.logs import get_logger

            get_logger("app").error(
                "daemon.failed",
                extra={"error": str(error), "error_code": error.code, "exit_code": code},
            )
        else:
            _error(str(error))
        return code


def _coleta_error(exc: BaseException) -> ColetaError | None:
    """The error of the tree that ``exc`` is or holds (an exception group from a task group
    holds it), or None when it holds anything else."""
    if isinstance(exc, ColetaError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_coleta_error(inner) for inner in exc.exceptions]
        leaves = [error for error in found if error is not None]
        if leaves and len(leaves) == len(found):
            return leaves[0]
    return None


def _exit_code(error: ColetaError) -> int:
    """The one mapping of the error tree to exit codes: a fatal error carries its own code;
    a transient one (NATS or PostgreSQL unreachable past ``connect_timeout_s``) is 3."""
    if isinstance(error, FatalError):
        return error.exit_code
    if isinstance(error, TransientError):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


async def _run(
    settings: Settings,
    config: str | None,
    roles: frozenset[str],
    worker_index: int | None,
    workers: str | None,
) -> int:
    from daemon.app import run

    return await run(
        settings, config=config, roles=roles, worker_index=worker_index, workers=workers
    )


#: What ``migrate`` reads of a config file and of the environment: the database, nothing else.
_DATABASE_KEYS = {
    "database_url": "DATABASE_URL",
    "database_schema": "COLETA_DATABASE_SCHEMA",
    "state_dir": "COLETA_STATE_DIR",
    "log_level": "LOG_LEVEL",
}


def _database_settings(path: str | None) -> Settings:
    """The settings ``migrate`` needs: no sources, no secrets, no NATS.

    ``DATABASE_URL`` alone is enough; a config file (``--config`` or ``$COLETA_CONFIG``)
    may give ``database_url`` and ``database_schema`` instead, the environment winning.
    """
    env = os.environ
    path = path or env.get("COLETA_CONFIG") or None
    data: dict[str, Any] = {}
    origin = "environment"
    if path is not None:
        origin = path
        data = {k: v for k, v in read_toml(path).items() if k in _DATABASE_KEYS}
    for key, var in _DATABASE_KEYS.items():
        if value := env.get(var):
            data[key] = value
    return parse_settings(data, origin)


async def _migrate(settings: Settings, grant_to: str | None = None) -> int:
    """Apply the migrations (with no database configured, to the embedded PostgreSQL), then
    grant ``grant_to`` the daemon's rights."""
    from daemon.platform.db import Database
    from daemon.platform.embedded import embedded_postgres
    from daemon.platform.logs import setup_logging
    from daemon.platform.migrate import grant

    setup_logging(settings.log_level)
    async with contextlib.AsyncExitStack() as stack:
        url = settings.database_url
        if url is None:
            url = await stack.enter_async_context(embedded_postgres(Path(settings.state_dir)))
        db = await stack.enter_async_context(Database.open(url, settings.database_schema))
        if grant_to is not None:
            async with db.pool.connection() as conn:
                await grant(conn, settings.database_schema, grant_to)
    sys.stdout.write(f"migrations applied to schema {settings.database_schema}\n")
    if grant_to is not None:
        sys.stdout.write(f"role {grant_to} granted the daemon's rights on it\n")
    return EXIT_OK


async def _client(args: argparse.Namespace) -> int:
    url, prefix, auth = client_server(args)
    try:
        async with open_request(url, prefix, auth, args.timeout) as request:
            return await COMMANDS[args.command](args, request)
    except ClientFailure as exc:
        from daemon.platform.redact import redact_text  # a NATS URL given with its password

        _error(redact_text(str(exc)))
        return exc.code
