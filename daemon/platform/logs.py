"""JSON lines on stdout: one object per event, tied to the trace it happened in.

The log message is a stable event name (``log.info("run.stored", extra={...})``); the
data goes in ``extra`` fields. Each line carries the current ``trace_id``/``span_id`` so
a log search leads to the trace, and the run's stored trace id leads to both.

Secrets never reach a line: every string of it — the event, each field (keys, nested values,
objects rendered as text), the error, the traceback — goes through ``redact.redact_text``,
which masks every secret the daemon holds by value and every URL's credentials by name;
fields named like credentials are replaced whole, and header mappings go through
``redact.redact_headers``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import msgspec
from opentelemetry import trace

from daemon.platform.redact import REDACTED, redact_headers, redact_text

__all__ = ["JsonFormatter", "get_logger", "setup_logging"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Chatty at INFO/DEBUG (one line per request or protocol frame); WARNING still shows.
NOISY_LOGGERS = ("asyncio", "httpcore", "httpx", "nats", "opentelemetry", "psycopg", "urllib3")

_CORE = ("ts", "level", "event", "logger", "trace_id", "span_id")
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)
_SECRET_FIELD = re.compile(
    r"authorization|token|passw(?:or)?d|secret|api_?key|cookie|credential", re.IGNORECASE
)
_HEADERS_FIELD = re.compile(r"headers", re.IGNORECASE)


def _fallback(value: object) -> str:
    """What ``msgspec.to_builtins`` cannot turn into data is rendered as text (an
    ``httpx.URL``, an exception); ``_clean`` redacts it then."""
    return str(value)


def _clean(key: str, value: object) -> object:
    """Scrub one extra field by its name and, for every string it holds, by its content."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        if _HEADERS_FIELD.search(key):
            return redact_headers({str(name): str(item) for name, item in value.items()})
        return {redact_text(str(name)): _clean(str(name), item) for name, item in value.items()}
    if _SECRET_FIELD.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(key, item) for item in value]
    # A struct, dataclass, datetime, URL …: as the data or text it would be encoded as, so
    # nothing inside it is encoded unseen.
    return _clean(key, msgspec.to_builtins(value, enc_hook=_fallback))


_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object (no newline; the handler adds it), with ``fields``
    on every line (a worker process's index)."""

    def __init__(self, fields: Mapping[str, str | int] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        created = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        line: dict[str, Any] = {
            "ts": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": redact_text(record.getMessage()),
            "logger": record.name,
            **self._fields,
        }
        # Formatting runs in the logging call's thread and context, so the current span
        # is the caller's.
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = trace.format_trace_id(context.trace_id)
            line["span_id"] = trace.format_span_id(context.span_id)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS:
                continue
            line["extra." + key if key in _CORE else key] = _clean(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line["error"] = redact_text(str(exc))
            line["exc_type"] = type(exc).__qualname__
            line["traceback"] = redact_text(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = redact_text(self.formatStack(record.stack_info))
        return _encoder.encode(line).decode()


class _JsonHandler(logging.StreamHandler[TextIO]):
    """Our handler type, so a second setup finds and replaces it (and nothing else)."""


class _Saved:
    """Logger levels before our first setup, so tests can put them back."""

    levels: dict[str, int] | None = None


def setup_logging(
    level: str | int = "INFO",
    stream: TextIO | None = None,
    *,
    fields: Mapping[str, str | int] | None = None,
) -> None:
    """Send every log record, ours and the libraries', as JSON lines to ``stream``, each with
    ``fields`` (a worker process says ``"worker": <index>`` on every line).

    Configures the root logger so library warnings are JSON too, keeps the noisy
    libraries at WARNING or above, and filters at the handler as well, so no logger
    below ``level`` leaks through. Idempotent: a second call replaces our handler and
    leaves foreign ones (pytest's capture) alone. Raises ValueError for an unknown level.
    """
    threshold = _parse_level(level)
    root = logging.getLogger()
    names = ("", "coleta", *NOISY_LOGGERS)
    if _Saved.levels is None:
        _Saved.levels = {name: logging.getLogger(name).level for name in names}
    _remove_handlers()
    handler = _JsonHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter(fields))
    handler.setLevel(threshold)
    root.addHandler(handler)
    root.setLevel(threshold)
    logging.getLogger("coleta").setLevel(threshold)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(threshold, logging.WARNING))


def get_logger(name: str) -> logging.Logger:
    """``coleta.<name>``; ``daemon.fetcher`` (a module's ``__name__``) gives ``coleta.fetcher``."""
    for prefix in ("daemon.", "coleta."):
        name = name.removeprefix(prefix)
    if name in ("", "daemon", "coleta"):
        return logging.getLogger("coleta")
    return logging.getLogger(f"coleta.{name}")


def _parse_level(level: str | int) -> int:
    if isinstance(level, int) and level in LEVELS.values():
        return level
    if isinstance(level, str) and level.strip().lower() in LEVELS:
        return LEVELS[level.strip().lower()]
    raise ValueError(f"invalid log level {level!r}; use one of {', '.join(LEVELS)}")


def _remove_handlers() -> None:
    for logger in (logging.getLogger(), logging.getLogger("coleta")):
        for handler in list(logger.handlers):
            if isinstance(handler, _JsonHandler) or logger.name == "coleta":
                logger.removeHandler(handler)
                handler.close()


def _reset_for_tests() -> None:
    """Remove our handler and restore the logger levels seen before the first setup."""
    _remove_handlers()
    for name, saved in (_Saved.levels or {}).items():
        logging.getLogger(name).setLevel(saved)
    _Saved.levels = None
