"""Records: how one response page becomes rows, and what the fetcher reads of it.

Pure, and shared by both ends of the raw stream: the fetcher counts a page's rows and reads its
pagination fields and incremental cursor (``inspect_page``), the writer stores the same rows
(``split_page``); both locate the records with the same code, so they always agree.

- ``granularity = "page"``: one row, the page as received (a JSON-lines body too).
- ``granularity = "record"``: one row per record, the records being the list at
  ``records_path`` (``"$"`` or unset: the body itself when it is a list), or the lines of a
  JSON-lines body (``application/x-ndjson``, ``application/jsonl``, …, or any body of JSON
  lines). Each row holds the API's own bytes of its record: numbers keep every digit.

Records are found in the raw bytes: one msgspec pass decodes the paths asked for into
``msgspec.Raw`` slices and skips the rest, so a page's records are never built as Python
objects; a record's incremental field is decoded alone, with a one-field struct.

A page that cannot be split (not JSON, no list at ``records_path``, a line that is not JSON, or
JSON nested deeper than msgspec decodes: ``RecursionError``, caught here) gives ``None``: it is
stored whole, as one row, never dropped, and has no pagination fields. msgspec's depth limit
depends on the caller's stack (about 1,000 levels less the frames above it), so a page nested
within a few dozen levels of it may count one row in the fetcher and be split by the writer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import msgspec

from daemon.jsonpath import TOP, PageFields, json_path, path_tokens

__all__ = [
    "PageFacts",
    "PagePaths",
    "PageShape",
    "cursor_max",
    "decode_json",
    "inspect_page",
    "is_json_lines_type",
    "needs_inspection",
    "split_page",
]

_JSON_LINES_TYPES = ("ndjson", "jsonl", "json-lines", "jsonlines", "json-seq")
#: What a body that is not (decodable) JSON raises; ``ValidationError`` is a ``DecodeError``.
_UNDECODABLE = (msgspec.DecodeError, UnicodeError, RecursionError)

#: A record or line as the API sent it: a slice of the page (``msgspec.Raw``) or its bytes.
Text = msgspec.Raw | bytes

_check = msgspec.json.Decoder(msgspec.Raw).decode
_raw_list = msgspec.json.Decoder(list[msgspec.Raw]).decode


class PagePaths(Protocol):
    """Where a source's pagination reads a page (``settings.Pagination``)."""

    @property
    def records_path(self) -> str | None: ...
    @property
    def has_more_path(self) -> str | None: ...
    @property
    def total_path(self) -> str | None: ...
    @property
    def cursor_path(self) -> str | None: ...
    @property
    def next_url_path(self) -> str | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PageShape:
    """What of a page is read: its source's granularity, ``records_path``, pagination, and the
    incremental cursor's field."""

    granularity: str = "page"
    records_path: str | None = None
    pagination: PagePaths | None = None
    cursor_field: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PageFacts:
    """What the fetcher needs of a page, from one pass over it."""

    #: What ``next_page`` reads (``PageFields``), or None: the page has no pagination fields.
    fields: PageFields | None = None
    #: The rows the writer stores for it.
    rows: int = 1
    #: The cursor field's value in each record that has it.
    cursor_values: list[Any] = field(default_factory=list)


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
    except _UNDECODABLE:
        return None


def needs_inspection(shape: PageShape) -> bool:
    """Whether ``inspect_page`` has anything to find: a page stored whole (a JSON-lines page
    too), of a source neither paginated nor incremental, is one row whatever it holds, and
    its body need not be read."""
    return (
        shape.granularity == "record"
        or shape.pagination is not None
        or shape.cursor_field is not None
    )


def inspect_page(shape: PageShape, content_type: str | None, body: bytes) -> PageFacts:
    """The page's pagination fields, row count and cursor candidates, in one pass.

    Never raises on what an API sends: a page that cannot be decoded is one row with no
    fields and no cursor.
    """
    if not needs_inspection(shape):
        return PageFacts()
    list_paths, value_paths = _paths(shape)
    found = _find(content_type, body, shape.granularity, list_paths, value_paths)
    if found is None:
        return PageFacts()
    records = found.values.get(shape.records_path or TOP)
    if not isinstance(records, list):
        records = None
    cursor: list[Any] = []
    if shape.cursor_field is not None and records is not None:
        cursor = _field_values(records, shape.cursor_field)
    rows = len(records) if shape.granularity == "record" and records is not None else 1
    return PageFacts(
        fields=found if shape.pagination is not None else None, rows=rows, cursor_values=cursor
    )


def split_page(
    content_type: str | None, body: bytes, *, granularity: str, records_path: str | None
) -> list[bytes] | None:
    """The page's rows, each one record's bytes as sent — or None: the page is one row,
    stored whole."""
    if granularity != "record":
        return None
    found = _find(content_type, body, granularity, (records_path or TOP,), ())
    records = found.values.get(records_path or TOP) if found is not None else None
    if not isinstance(records, list):
        return None
    return [bytes(record) for record in records]


def _paths(shape: PageShape) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The paths whose lists of records (``Raw``), and whose values, ``shape`` reads."""
    lists = {shape.records_path or TOP}
    values: set[str] = set()
    p = shape.pagination
    if p is not None:
        lists.add(p.records_path or TOP)
        values.update(
            path
            for path in (p.has_more_path, p.total_path, p.cursor_path, p.next_url_path)
            if path is not None
        )
    return tuple(sorted(lists)), tuple(sorted(values - lists))


def _find(
    content_type: str | None,
    body: bytes,
    granularity: str,
    list_paths: tuple[str, ...],
    value_paths: tuple[str, ...],
) -> PageFields | None:
    """What ``body`` holds at these paths, or None when it is neither JSON nor JSON lines.

    A JSON-lines body is its lines (at ``"$"``); so is, with ``granularity = "record"``, a body
    that is not one JSON document but parses line by line.
    """
    if not body:
        return None
    if is_json_lines_type(content_type):
        return _lines(body, list_paths)
    try:
        return _locator(list_paths, value_paths)(body)
    except RecursionError:
        return None
    except _UNDECODABLE:
        # Not one JSON document: JSON lines served with a vague content type?
        return _lines(body, list_paths) if granularity == "record" and body.strip() else None


def _lines(body: bytes, list_paths: tuple[str, ...]) -> PageFields | None:
    """The lines of a JSON-lines body: its records, wherever records are looked for."""
    texts: list[Text] = []
    for line in body.splitlines():
        line = line.strip().lstrip(b"\x1e")  # json-seq records start with RS
        if not line:
            continue
        try:
            _check(line)
        except _UNDECODABLE:
            return None
        texts.append(line)
    return PageFields({path: texts for path in list_paths})


def _field_values(records: Sequence[Text], field: str) -> list[Any]:
    decode = _field_decoder(field)
    found = []
    for record in records:
        try:
            value = decode(record)
        except _UNDECODABLE:
            continue  # not an object, or the path runs through something else
        if value is not None:
            found.append(value)
    return found


@functools.lru_cache(maxsize=256)
def _field_decoder(field: str) -> Callable[[Text], Any]:
    """Decode one record's ``field`` alone (the rest is skipped, not built)."""
    tree = _tree([(field, Any)])
    if tree is None:  # an index in the path: the record is decoded whole
        return lambda record: json_path(msgspec.json.decode(record), field)
    decode = msgspec.json.Decoder(_struct(tree)).decode
    return lambda record: json_path(_plain(decode(record)), field)


@functools.lru_cache(maxsize=256)
def _locator(
    list_paths: tuple[str, ...], value_paths: tuple[str, ...]
) -> Callable[[bytes], PageFields]:
    """One decode of a page into ``PageFields``: lists of ``Raw`` at ``list_paths``, values at
    ``value_paths``. A path ``"$"`` is the body itself.

    When every path is a chain of keys that does not run through another one's value, a
    single msgspec pass reads them all (a struct per object on the way). Otherwise, or when
    the page has another shape than the paths expect, each path is walked alone.
    """
    leaves: list[tuple[str, Any]] = [(path, list[msgspec.Raw]) for path in list_paths]
    leaves += [(path, Any) for path in value_paths]
    tree = _tree([(path, leaf) for path, leaf in leaves if path != TOP])
    if tree is None:
        return functools.partial(_walk_all, list_paths, value_paths)
    shape: Any = _struct(tree)
    if TOP in list_paths:
        shape = list[msgspec.Raw] | shape  # the body itself may be the records
    decode = msgspec.json.Decoder(shape).decode
    paths = [path for path, _ in leaves]

    def locate(body: bytes) -> PageFields:
        try:
            value = decode(body)
        except msgspec.ValidationError:
            return _walk_all(list_paths, value_paths, body)
        if isinstance(value, list):
            return PageFields({TOP: value})
        plain = _plain(value)
        return PageFields(
            {path: found for path in paths if (found := json_path(plain, path)) is not None}
        )

    return locate


def _walk_all(list_paths: tuple[str, ...], value_paths: tuple[str, ...], body: bytes) -> PageFields:
    """Each path found on its own: a decode per step, the rest of each level skipped."""
    _check(body)  # not JSON at all: DecodeError, as in the single pass
    found: dict[str, Any] = {}
    for path, as_list in [(p, True) for p in list_paths] + [(p, False) for p in value_paths]:
        raw = _raw_at(body, path)
        if raw is None:
            continue
        try:
            value = _raw_list(raw) if as_list else msgspec.json.decode(raw)
        except msgspec.ValidationError:
            continue
        if value is not None:
            found[path] = value
    return PageFields(found)


def _raw_at(body: Text, path: str) -> Text | None:
    """The bytes of the value at ``path``, or None where there is none."""
    value: Text = body
    if path == TOP:
        return value
    for name, index in path_tokens(path):
        try:
            if index:
                items = _raw_list(value)
                if int(index) >= len(items):
                    return None
                value = items[int(index)]
            else:
                value = _key_decoder(name)(value).value
        except msgspec.ValidationError:
            return None
        if not len(value):
            return None  # the key is absent
    return value


@functools.lru_cache(maxsize=256)
def _key_decoder(key: str) -> Callable[[Text], Any]:
    """Decode an object's ``key`` alone, as ``Raw`` (empty when the key is absent)."""
    one = msgspec.defstruct("Key", [("value", msgspec.Raw, msgspec.Raw())], rename={"value": key})
    return msgspec.json.Decoder(one).decode


def _tree(leaves: list[tuple[str, Any]]) -> dict[str, Any] | None:
    """The paths as nested dicts of keys (leaves: their types), or None when they cannot be
    one struct: an index in a path, or a path through another one's value."""
    tree: dict[str, Any] = {}
    for path, leaf in leaves:
        if "[" in path:
            return None
        *parents, last = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                return None  # a path runs through another one's value
        if isinstance(node.get(last, leaf), dict) or node.get(last, leaf) != leaf:
            return None
        node[last] = leaf
    return tree


def _struct(tree: dict[str, Any]) -> type[msgspec.Struct]:
    fields = []
    rename = {}
    for i, (key, sub) in enumerate(tree.items()):
        kind = _struct(sub) if isinstance(sub, dict) else sub
        fields.append((f"f{i}", Optional[kind], None))  # noqa: UP045 (a runtime type)
        rename[f"f{i}"] = key
    return msgspec.defstruct("PageFields", fields, rename=rename)


def _plain(value: Any) -> Any:
    """Decoded structs back into the dicts ``json_path`` walks."""
    if isinstance(value, msgspec.Struct):
        found = {}
        for name, key in zip(value.__struct_fields__, value.__struct_encode_fields__, strict=True):
            item = getattr(value, name)
            if item is not None:
                found[key] = _plain(item)
        return found
    return value


def _comparable(value: Any) -> tuple[int, Any] | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return None


def cursor_max(current: Any, candidates: list[Any]) -> Any:
    """The largest of ``candidates`` (a field's values among records) and ``current``: numbers
    numerically, strings lexicographically — ISO 8601 timestamps of one format sort right.
    Values of another kind than ``current``'s are ignored."""
    best = current
    best_key = _comparable(best)
    for value in candidates:
        key = _comparable(value)
        if key is None or (best_key is not None and key[0] != best_key[0]):
            continue
        if best_key is None or key[1] > best_key[1]:
            best, best_key = value, key
    return best
