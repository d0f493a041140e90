"""Page → rows: what of a page goes to ``data`` (jsonb) or ``body`` (bytea), and how.

A page is one row, or one row per record (``granularity = "record"``): see
``daemon.records``. JSON that jsonb can hold goes to ``data``; anything else — not JSON,
``\\u0000``, a lone surrogate, invalid UTF-8, nesting deeper than ``JSONB_MAX_DEPTH`` — to
``body``, byte for byte. A page whose body came
through the object store and is stored whole stays in its temporary file and is streamed to
PostgreSQL with a binary COPY (``copy_large``), so it is never in memory twice.

Rows are content-addressed: each carries ``content_sha256``, the SHA-256 of its content
exactly as inserted (the page body, or the record's text), and the unique key is
``(run_id, page, record, content_sha256)`` with ``ON CONFLICT DO NOTHING``. A message delivered
again stores nothing twice; a replay that fetched other content at the same place stores it
beside the first, with its ``replay`` number, instead of dropping it.

The statements are ``_sql``'s; the rows a run's record and its source's state take, ``_runs``'s.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import msgspec
import psycopg

from contracts import RawPayload
from daemon import records
from daemon.platform.logs import get_logger
from daemon.writer._runs import printable
from daemon.writer._sql import COPY_LARGE_BODY, CREATE_LARGE_BODY, INSERT_LARGE_BODY

__all__ = [
    "JSONB_MAX_DEPTH",
    "LargeRow",
    "body_file",
    "copy_large",
    "data_rows",
    "jsonb_can_hold",
    "rows_of_file",
    "split_body",
    "to_body",
]

log = get_logger("writer")

#: Binary COPY of one row of one field: the header, then the field's length (the trailer ends).
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
#: jsonb's binary input: a version byte, then the JSON text.
_JSONB_VERSION = b"\x01"
#: A large body is read and sent to PostgreSQL this much at a time.
_COPY_CHUNK = 1024 * 1024
#: PostgreSQL holds no field larger than 1 GB.
_MAX_FIELD_BYTES = (1 << 30) - 1 - len(_JSONB_VERSION)


_JSON_START = re.compile(rb"^\s*[\[{]")

#: JSON nested deeper than this goes to ``body``. PostgreSQL parses jsonb recursively: with
#: its default ``max_stack_depth`` (2 MB) version 15 refuses about 13,000 levels of objects
#: ("stack depth limit exceeded", SQLSTATE 54001), and the whole batch with them.
JSONB_MAX_DEPTH = 10_000


def split_body(content_type: str | None, body: bytes) -> tuple[str | None, bytes | None]:
    """Where a body goes: ``(json_text, None)`` for the ``data`` jsonb column, else
    ``(None, body)`` for ``body`` bytea, byte for byte.

    JSON is recognised by its content type, or by its first character when the type says
    nothing more specific. JSON that jsonb cannot hold (``\\u0000``, a lone surrogate, invalid
    UTF-8, nesting deeper than ``JSONB_MAX_DEPTH``) goes to ``body`` too: stored as received,
    never dropped or altered.
    """
    if not _looks_like_json(content_type, body):
        return None, body
    try:
        # Checked, not built: decoding to ``Raw`` validates the syntax (a lone surrogate escape
        # included) without making a Python object per value — 5x faster on a 20 KB page,
        # and a 50 MB body costs no object tree.
        if not _is_json(body):
            return None, body
        text = body.decode("utf-8")
    except UnicodeError:
        return None, body
    if b"\\u0000" in body:
        return None, body
    return text, None


def _looks_like_json(content_type: str | None, body: bytes) -> bool:
    if not body:
        return False
    ctype = (content_type or "").lower()
    return "json" in ctype or (
        (not ctype or ctype.startswith("text/plain")) and _JSON_START.match(body) is not None
    )


def jsonb_can_hold(content_type: str | None, body: bytes) -> bool:
    """``split_body``'s verdict (``data``, not ``body``) without making a str of the body:
    the check of a large body costs no second copy of it."""
    if not _looks_like_json(content_type, body) or b"\\u0000" in body:
        return False
    return _is_json(body) and _is_utf8(body)


def _is_utf8(body: bytes) -> bool:
    """Whether ``body`` is valid UTF-8, decoded a slice at a time (no whole str of it)."""
    if body.isascii():
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(body)
    try:
        for start in range(0, len(view), _COPY_CHUNK):
            decoder.decode(view[start : start + _COPY_CHUNK])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


_check_json = msgspec.json.Decoder(msgspec.Raw).decode


def _is_json(body: bytes) -> bool:
    """Whether ``body`` is one JSON document jsonb can parse (UTF-8 aside).

    msgspec checks it without building it, up to about 1,000 levels deep; deeper it raises
    ``RecursionError``, and the slower ``_deep_json_ok`` decides.
    """
    try:
        _check_json(body)
    except msgspec.DecodeError:
        return False
    except RecursionError:
        return _deep_json_ok(body)
    return True


_TOKEN = re.compile(
    rb"""[ \t\n\r]*(?:
        (?P<open>[\[{])
      | (?P<close>[\]}])
      | (?P<comma>,)
      | (?P<colon>:)
      | (?P<string>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")
      | (?P<scalar>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)
    )""",
    re.VERBOSE,
)
#: What may come next in ``_deep_json_ok``.
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _COMMA_OR_CLOSE, _DONE = range(7)
_PAIRS = {ord("]"): ord("["), ord("}"): ord("{")}


def _deep_json_ok(body: bytes) -> bool:
    """Whether ``body`` is one JSON document at most ``JSONB_MAX_DEPTH`` deep, checked token by
    token with a stack of its own (no recursion), for JSON too deep for msgspec.

    A token at a time in Python: about a second for a million tokens, only ever for a page
    nested more than 1,000 levels deep, and given up at once past ``JSONB_MAX_DEPTH``.
    """
    stack = bytearray()
    expect = _VALUE
    pos = 0
    while (token := _TOKEN.match(body, pos)) is not None:
        kind, pos = token.lastgroup, token.end()
        if kind == "open":
            if expect not in (_VALUE, _VALUE_OR_CLOSE) or len(stack) == JSONB_MAX_DEPTH:
                return False
            stack.append(body[pos - 1])
            expect = _KEY_OR_CLOSE if body[pos - 1] == ord("{") else _VALUE_OR_CLOSE
        elif kind == "close":
            if expect not in (_VALUE_OR_CLOSE, _KEY_OR_CLOSE, _COMMA_OR_CLOSE):
                return False
            if stack.pop() != _PAIRS[body[pos - 1]]:
                return False
            expect = _COMMA_OR_CLOSE if stack else _DONE
        elif kind == "comma":
            if expect != _COMMA_OR_CLOSE:
                return False
            expect = _KEY if stack[-1] == ord("{") else _VALUE
        elif kind == "colon":
            if expect != _COLON:
                return False
            expect = _VALUE
        elif kind == "string" and expect in (_KEY, _KEY_OR_CLOSE):
            expect = _COLON
        elif expect in (_VALUE, _VALUE_OR_CLOSE):
            expect = _COMMA_OR_CLOSE if stack else _DONE
        else:
            return False
        if kind == "string" and b"\\u" in token["string"] and not _valid_escapes(token["string"]):
            return False
    return expect == _DONE and not body[pos:].strip(b" \t\n\r")


def _valid_escapes(string: bytes) -> bool:
    """Whether a JSON string's ``\\u`` escapes pair their surrogates (jsonb refuses a lone one)."""
    try:
        msgspec.json.decode(string)
    except msgspec.DecodeError:
        return False
    return True


@dataclass(slots=True)
class LargeRow:
    """A page stored whole whose body came through the object store: its other columns (up to
    ``replay``; its digest is taken as ``copy_large`` streams it), the column its body goes
    to, and the temporary file holding it."""

    values: tuple[Any, ...]
    column: Literal["data", "body"]
    file: io.BufferedIOBase
    size: int


def data_rows(event: RawPayload, body: bytes) -> list[tuple[Any, ...]]:
    """The rows of one page (``INSERT_DATA``'s parameters): the page whole, or one per record,
    each with the SHA-256 of its content."""
    common = (event.run_id, event.source, event.page)
    tail = (
        event.scheduled_for,
        event.fetched_at,
        event.status_code,
        printable(event.content_type),
        event.replay,
    )
    split = records.split_page(
        event.content_type, body, granularity=event.granularity, records_path=event.records_path
    )
    if split is None:
        if event.granularity == "record":
            log.warning(
                "write.page_whole",
                extra={
                    "source": event.source,
                    "run_id": event.run_id,
                    "page": event.page,
                    "reason": "not JSON, or no list of records at"
                    f" {event.records_path or 'the top level'}",
                },
            )
        digest = hashlib.sha256(body).digest()
        return [(*common, 0, *tail, digest, *split_body(event.content_type, body))]
    return [
        (*common, i, *tail, hashlib.sha256(text).digest(), *split_body("application/json", text))
        for i, text in enumerate(split)
    ]


def rows_of_file(
    event: RawPayload, file: io.BufferedIOBase
) -> tuple[list[tuple[Any, ...]], list[LargeRow]]:
    """The rows of a page whose body came through the object store, into ``file``.

    Split into records, its rows are built like any page's. Stored whole (the common case for
    a large body), it is read once to check whether jsonb can hold it, and stays in the file:
    ``copy_large`` streams it to PostgreSQL, so it is never in memory twice.
    """
    file.seek(0)
    body = file.read()
    if event.granularity == "record":
        return data_rows(event, body), []
    values = (
        event.run_id,
        event.source,
        event.page,
        0,
        event.scheduled_for,
        event.fetched_at,
        event.status_code,
        printable(event.content_type),
        event.replay,
    )
    column: Literal["data", "body"] = "data" if jsonb_can_hold(event.content_type, body) else "body"
    return [], [LargeRow(values, column, file, len(body))]


def body_file() -> io.BufferedIOBase:
    """An anonymous temporary file (in ``$TMPDIR`` or ``/tmp``) for a body read back."""
    return tempfile.TemporaryFile(prefix="coleta-body-")


async def copy_large(cur: psycopg.AsyncCursor[Any], rows: Sequence[LargeRow]) -> None:
    """Insert pages stored whole from their files, as ``INSERT_DATA`` would.

    Each body goes into a temporary table with a binary COPY (no escaping; the file read a
    MiB at a time, so libpq holds a chunk, not the body), hashed as it is read, then moves into
    ``collected_data`` with its digest and ``ON CONFLICT DO NOTHING``. jsonb's binary input is
    a version byte and the JSON text.
    """
    await cur.execute(CREATE_LARGE_BODY)
    for row in rows:
        jsonb = row.column == "data"
        if row.size > _MAX_FIELD_BYTES:
            raise psycopg.DataError(f"a {row.size}-byte body is larger than PostgreSQL stores")
        header = _COPY_HEADER + struct.pack("!hi", 1, row.size + (1 if jsonb else 0))
        row.file.seek(0)
        digest = hashlib.sha256()
        async with cur.copy(COPY_LARGE_BODY[row.column]) as copy:
            await copy.write(header + _JSONB_VERSION if jsonb else header)
            while chunk := await anyio.to_thread.run_sync(row.file.read, _COPY_CHUNK):
                digest.update(chunk)
                await copy.write(chunk)
            await copy.write(_COPY_TRAILER)
        await cur.execute(INSERT_LARGE_BODY, (*row.values, digest.digest()))


def to_body(rows: list[tuple[Any, ...]], large: Sequence[LargeRow]) -> bool:
    """Send the ``data`` of these rows to ``body`` instead, byte for byte (in place); False
    when none had any. For JSON jsonb refuses only on insert: a number out of its range."""
    moved = False
    for i, row in enumerate(rows):
        *head, data, _ = row
        if data is not None:
            rows[i] = (*head, None, data.encode("utf-8"))
            moved = True
    for whole in large:
        if whole.column == "data":
            whole.column = "body"
            moved = True
    return moved
