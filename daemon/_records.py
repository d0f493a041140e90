"""Records: how one response page becomes rows, and the incremental cursor it carries.

Pure, and shared by both ends of the raw stream: the fetcher counts a page's rows and reads
its cursor field, the writer stores the same rows, so both always agree.

- ``granularity = "page"``: one row, the page as received — except a JSON-lines body
  (``application/x-ndjson``, ``application/jsonl``, …), which is one row per line.
- ``granularity = "record"``: one row per record, the records being the list at
  ``records_path`` (or the body itself when it is a list), or the lines of a JSON-lines body.

A page that cannot be split (not JSON, no list at ``records_path``, a line that is not JSON)
gives ``None``: it is stored whole, as one row, never dropped.
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon._pagination import json_path

__all__ = [
    "Split",
    "cursor_max",
    "decode_json",
    "is_json_lines_type",
    "records",
    "row_count",
    "split_page",
]

_JSON_LINES_TYPES = ("ndjson", "jsonl", "json-lines", "jsonlines", "json-seq")


def is_json_lines_type(content_type: str | None) -> bool:
    """``application/x-ndjson``, ``application/jsonl`` and their relatives."""
    ctype = (content_type or "").lower().split(";")[0]
    return any(name in ctype for name in _JSON_LINES_TYPES)


def decode_json(content_type: str | None, body: bytes) -> Any:
    """The body as one JSON value, or None when it is not one (or is JSON lines)."""
    if not body or is_json_lines_type(content_type):
        return None
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeError):
        return None


class Split(msgspec.Struct, frozen=True, kw_only=True):
    """A page split into records: each record's JSON text and decoded value."""

    texts: list[bytes]
    values: list[Any]


def _lines(body: bytes) -> Split | None:
    texts: list[bytes] = []
    values: list[Any] = []
    for line in body.splitlines():
        line = line.strip().lstrip(b"\x1e")  # json-seq records start with RS
        if not line:
            continue
        try:
            values.append(msgspec.json.decode(line))
        except (msgspec.DecodeError, UnicodeError):
            return None
        texts.append(line)
    return Split(texts=texts, values=values)


def split_page(
    content_type: str | None, body: bytes, *, granularity: str, records_path: str | None
) -> Split | None:
    """The page's rows, one per record — or None: the page is one row, stored whole."""
    if is_json_lines_type(content_type):
        return _lines(body)
    if granularity != "record":
        return None
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeError):
        # Not one JSON document: JSON lines served with a vague content type?
        return _lines(body) if body.strip() else None
    found = json_path(value, records_path) if records_path else value
    if not isinstance(found, list):
        return None
    return Split(texts=[msgspec.json.encode(item) for item in found], values=found)


def records(content_type: str | None, body: bytes, *, records_path: str | None) -> list[Any]:
    """The page's records whatever the granularity (for the incremental cursor)."""
    split = split_page(content_type, body, granularity="record", records_path=records_path)
    return split.values if split is not None else []


def row_count(
    content_type: str | None, body: bytes, *, granularity: str, records_path: str | None
) -> int:
    """How many rows the writer stores for this page."""
    split = split_page(content_type, body, granularity=granularity, records_path=records_path)
    return 1 if split is None else len(split.texts)


def _comparable(value: Any) -> tuple[int, Any] | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return None


def cursor_max(current: Any, values: list[Any], field: str) -> Any:
    """The largest ``field`` among ``values`` and ``current`` (numbers numerically, strings
    lexicographically — ISO 8601 timestamps of one format sort right). Records without the
    field, or with a value of another kind than ``current``'s, are ignored."""
    best = current
    best_key = _comparable(best)
    for record in values:
        key = _comparable(json_path(record, field))
        if key is None or (best_key is not None and key[0] != best_key[0]):
            continue
        if best_key is None or key[1] > best_key[1]:
            best, best_key = json_path(record, field), key
    return best
