"""``python -m bench._probe OUT.json [--cprofile] [-m daemon] ARGS…``: the daemon, counted.

``python -m daemon ARGS…`` with counters.

What a run costs in messages, statements, spans and log lines, counted inside the daemon
process by wrapping the libraries' entry points: every NATS message the client sends
(``Client._send_publish``) or receives (``Client._process_msg``), by kind; every SQL statement
execution (one per parameter set of an ``executemany``), by statement and table; every span
started, by name; every log record emitted, by level and event. SIGUSR1 zeroes the counters
(the benchmark sends it just before its measured window, so start-up is not counted); they are
written to ``OUT.json`` when the process exits. Bench-only: the daemon never imports this.
"""

from __future__ import annotations

import atexit
import cProfile
import json
import logging
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["main"]

_COUNTS: dict[str, Counter[str]] = {
    "nats_out": Counter(),
    "nats_in": Counter(),
    "sql": Counter(),
    "spans": Counter(),
    "logs": Counter(),
}

_ACK_KINDS = {b"-NAK": "nak", b"+WPI": "in_progress", b"+TERM": "term", b"": "ack"}
_TABLE = re.compile(
    r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM|FROM|COPY)\s+([a-z_][a-z_0-9.]*)", re.IGNORECASE
)


def _subject_kind(subject: str, payload: bytes = b"") -> str:
    """A subject reduced to what it is for: the bus prefix and per-source parts dropped."""
    if subject.startswith("$JS.ACK."):
        kind = next((v for k, v in _ACK_KINDS.items() if payload.startswith(k)), "ack?")
        return f"$JS.ACK ({kind})"
    if subject.startswith("$JS.API."):
        parts = subject.split(".")
        return ".".join(parts[:4]) if parts[2] in ("CONSUMER", "STREAM", "DIRECT") else subject
    if subject.startswith("$KV."):
        return f"$KV.{subject.split('.')[1].rsplit('_', 1)[-1]} (put/create/update/delete)"
    if subject.startswith("$O."):
        return "$O (object store)"
    if subject.startswith(("_INBOX.", "$SRV.")):
        return subject.split(".")[0] + " (reply)" if subject.startswith("_INBOX.") else "$SRV"
    parts = subject.split(".")
    return ".".join(["<prefix>", *parts[1:2]]) + (".<source>" if len(parts) > 2 else "")


def _statement(query: object) -> str:
    text = query.decode() if isinstance(query, bytes) else str(query)
    if not text.strip():
        return "(empty: a pool's connection check)"
    verb = text.split(None, 1)[0].upper()
    if verb == "WITH":
        verb = "WITH…INSERT" if "INSERT" in text.upper() else "WITH"
    found = _TABLE.findall(text)
    if verb in ("INSERT", "WITH…INSERT"):
        table = next((t for k, t in found if k.upper().startswith("INSERT")), "?")
    elif found:
        table = found[0][1]
    else:
        table = ""
    return f"{verb} {table}".strip()


def _install() -> None:
    import nats.aio.client
    import psycopg
    from opentelemetry.sdk import trace as sdk_trace

    client = nats.aio.client.Client
    send_publish, process_msg = client._send_publish, client._process_msg

    async def _send(self: Any, subject: str, reply: str, payload: bytes, *a: Any) -> None:
        _COUNTS["nats_out"][_subject_kind(subject, payload)] += 1
        await send_publish(self, subject, reply, payload, *a)

    async def _received(
        self: Any, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        _COUNTS["nats_in"][_subject_kind(subject.decode())] += 1
        await process_msg(self, sid, subject, reply, data, headers)

    # Replaced on the class for every connection of the process (a probe, not an API).
    client._send_publish = _send  # type: ignore[method-assign,assignment]
    client._process_msg = _received  # type: ignore[method-assign]

    cursor = psycopg.AsyncCursor
    execute, executemany = cursor.execute, cursor.executemany

    async def _execute(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        _COUNTS["sql"][_statement(query)] += 1
        return await execute(self, query, params, **kw)

    async def _executemany(self: Any, query: Any, params_seq: Iterable[Any], **kw: Any) -> None:
        params = list(params_seq)
        _COUNTS["sql"][_statement(query)] += len(params)
        await executemany(self, query, params, **kw)

    cursor.execute = _execute  # type: ignore[method-assign]
    cursor.executemany = _executemany  # type: ignore[method-assign]

    start_span = sdk_trace.Tracer.start_span

    def _start_span(self: Any, name: str, *a: Any, **kw: Any) -> Any:
        _COUNTS["spans"][re.sub(r"\.(collect|raw|deferred)\..*$", r".\1.<source>", name)] += 1
        return start_span(self, name, *a, **kw)

    sdk_trace.Tracer.start_span = _start_span  # type: ignore[method-assign]

    call_handlers = logging.Logger.callHandlers

    def _call_handlers(self: logging.Logger, record: logging.LogRecord) -> None:
        _COUNTS["logs"][f"{record.levelname} {record.getMessage()[:60]}"] += 1
        call_handlers(self, record)

    logging.Logger.callHandlers = _call_handlers  # type: ignore[method-assign]


#: With ``--cprofile``: the event loop's thread profiled from SIGUSR1 on into ``OUT.prof``,
#: timed by CPU time (``process_time``), not wall time, so waiting for a core counts nothing.
_PROFILER = cProfile.Profile(time.process_time)
_PROFILING: list[Path] = []


def _reset(signum: int, frame: object) -> None:
    for counter in _COUNTS.values():
        counter.clear()
    if _PROFILING:
        _PROFILER.enable()


def _write(out: Path) -> None:
    out.write_text(json.dumps(_COUNTS, indent=1, sort_keys=True))
    if _PROFILING:
        _PROFILER.disable()
        _PROFILER.dump_stats(str(_PROFILING[0]))


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    if args[:1] == ["--cprofile"]:
        _PROFILING.append(out.with_suffix(".prof"))
        args = args[1:]
    _install()
    signal.signal(signal.SIGUSR1, _reset)
    atexit.register(_write, out)
    if args[:2] == ["-m", "daemon"]:  # as ``running_daemon(wrap=…)`` puts it
        args = args[2:]
    sys.argv = ["coleta", *args]
    from daemon.cli import main as coleta

    raise SystemExit(coleta())


if __name__ == "__main__":
    main()
