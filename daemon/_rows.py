"""Page → rows: what of a page goes to ``data`` (jsonb) or ``body`` (bytea), and how.

A page is one row, or one row per record (``granularity = "record"``, or a JSON-lines body):
see ``daemon._records``. JSON that jsonb can hold goes to ``data``; anything else — not JSON,
``\\u0000``, a lone surrogate, invalid UTF-8 — to ``body``, byte for byte. A page whose body came
through the object store and is stored whole stays in its temporary file and is streamed to
PostgreSQL with a binary COPY (``copy_large``), so it is never in memory twice.
"""

from __future__ import annotations

import codecs
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
from daemon import _records
from daemon._logging import get_logger

__all__ = [
    "INSERT_DATA",
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

INSERT_DATA = """
INSERT INTO collected_data
    (run_id, source, page, record, scheduled_for, collected_at, http_status, content_type,
     data, body)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT (run_id, page, record) DO NOTHING
"""

#: A page stored whole from the object store (``LargeRow``) is streamed into this table with
#: COPY, then moved into ``collected_data`` under the rule of ``INSERT_DATA``. Dropped at commit.
CREATE_LARGE_BODY = """
CREATE TEMPORARY TABLE IF NOT EXISTS coleta_large_body (data jsonb, body bytea) ON COMMIT DROP
"""
COPY_LARGE_BODY = {
    "data": "COPY coleta_large_body (data) FROM STDIN (FORMAT BINARY)",
    "body": "COPY coleta_large_body (body) FROM STDIN (FORMAT BINARY)",
}
INSERT_LARGE_BODY = """
WITH large AS (DELETE FROM coleta_large_body RETURNING data, body)
INSERT INTO collected_data
    (run_id, source, page, record, scheduled_for, collected_at, http_status, content_type,
     data, body)
SELECT %s::text, %s::text, %s::integer, %s::integer, %s::timestamptz, %s::timestamptz,
       %s::integer, %s::text, data, body
FROM large
ON CONFLICT (run_id, page, record) DO NOTHING
"""
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


def split_body(content_type: str | None, body: bytes) -> tuple[str | None, bytes | None]:
    """Where a body goes: ``(json_text, None)`` for the ``data`` jsonb column, else
    ``(None, body)`` for ``body`` bytea, byte for byte.

    JSON is recognised by its content type, or by its first character when the type says
    nothing more specific. JSON that jsonb cannot hold (``\\u0000``, a lone surrogate, invalid
    UTF-8) goes to ``body`` too: stored as received, never dropped or altered.
    """
    if not _looks_like_json(content_type, body):
        return None, body
    try:
        # Checked, not built: decoding to ``Raw`` validates the syntax (a lone surrogate escape
        # included) without making a Python object per value — 5x faster on a 20 KB page,
        # and a 50 MB body costs no object tree.
        _check_json(body)
        text = body.decode("utf-8")
    except (msgspec.DecodeError, UnicodeError):
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
    try:
        _check_json(body)
    except msgspec.DecodeError:
        return False
    return _is_utf8(body)


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


@dataclass(slots=True)
class LargeRow:
    """A page stored whole whose body came through the object store: its other columns, the
    column its body goes to, and the temporary file holding it (streamed by ``copy_large``)."""

    values: tuple[Any, ...]
    column: Literal["data", "body"]
    file: io.BufferedIOBase
    size: int


def data_rows(event: RawPayload, body: bytes) -> list[tuple[Any, ...]]:
    """The rows of one page: the page whole, or one per record."""
    common = (event.run_id, event.source, event.page)
    tail = (event.scheduled_for, event.fetched_at, event.status_code, event.content_type)
    split = _records.split_page(
        event.content_type, body, granularity=event.granularity, records_path=event.records_path
    )
    if split is None:
        if event.granularity == "record" or _records.is_json_lines_type(event.content_type):
            log.warning(
                "write.page_whole",
                extra={
                    "source": event.source,
                    "run_id": event.run_id,
                    "page": event.page,
                    "reason": f"no list of records at {event.records_path or 'the top level'}"
                    if event.granularity == "record"
                    else "a line is not JSON",
                },
            )
        return [(*common, 0, *tail, *split_body(event.content_type, body))]
    return [
        (*common, i, *tail, *split_body("application/json", text))
        for i, text in enumerate(split.texts)
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
    if event.granularity == "record" or _records.is_json_lines_type(event.content_type):
        return data_rows(event, body), []
    values = (
        event.run_id,
        event.source,
        event.page,
        0,
        event.scheduled_for,
        event.fetched_at,
        event.status_code,
        event.content_type,
    )
    column: Literal["data", "body"] = "data" if jsonb_can_hold(event.content_type, body) else "body"
    return [], [LargeRow(values, column, file, len(body))]


def body_file() -> io.BufferedIOBase:
    """An anonymous temporary file (in ``$TMPDIR`` or ``/tmp``) for a body read back."""
    return tempfile.TemporaryFile(prefix="coleta-body-")


async def copy_large(cur: psycopg.AsyncCursor[Any], rows: Sequence[LargeRow]) -> None:
    """Insert pages stored whole from their files, as ``INSERT_DATA`` would.

    Each body goes into a temporary table with a binary COPY (no escaping; the file read a
    MiB at a time, so libpq holds a chunk, not the body), then moves into ``collected_data``
    with ``ON CONFLICT DO NOTHING``. jsonb's binary input is a version byte and the JSON text.
    """
    await cur.execute(CREATE_LARGE_BODY)
    for row in rows:
        jsonb = row.column == "data"
        if row.size > _MAX_FIELD_BYTES:
            raise psycopg.DataError(f"a {row.size}-byte body is larger than PostgreSQL stores")
        header = _COPY_HEADER + struct.pack("!hi", 1, row.size + (1 if jsonb else 0))
        row.file.seek(0)
        async with cur.copy(COPY_LARGE_BODY[row.column]) as copy:
            await copy.write(header + _JSONB_VERSION if jsonb else header)
            while chunk := await anyio.to_thread.run_sync(row.file.read, _COPY_CHUNK):
                await copy.write(chunk)
            await copy.write(_COPY_TRAILER)
        await cur.execute(INSERT_LARGE_BODY, row.values)


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
