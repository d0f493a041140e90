"""Paths into JSON: ``data.items``, ``results[0].rows``, and ``"$"``, the document itself.

Pure, and shared by whoever reads a page: the settings check the paths a source configures
(``check_path``, ``check_records_path``), the records module finds them in a page's bytes, and
pagination reads them from what it found (``json_path`` over a decoded body or ``PageFields``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["TOP", "PageFields", "check_path", "check_records_path", "json_path", "path_tokens"]

#: The path of the document itself (a ``records_path`` for a body that is the list of records).
TOP = "$"

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_PATH_RE = re.compile(r"^(?:[^.\[\]]+|\[\d+\])(?:\.[^.\[\]]+|\[\d+\])*$")


@dataclass(frozen=True, slots=True)
class PageFields:
    """What a page holds at the paths its pagination reads, found without decoding the whole
    page (``records.inspect_page``): ``values[path]``, absent when the page has nothing there.
    ``json_path`` reads it as it reads a decoded body."""

    values: dict[str, Any]


def path_tokens(path: str) -> list[tuple[str, str]]:
    """``path``'s steps in order: ``(key, "")`` for a key, ``("", index)`` for ``[index]``."""
    return _PATH_TOKEN.findall(path)


def check_path(path: str) -> None:
    """Raise ValueError unless ``path`` is a path like ``data.items`` or ``a[0].b``."""
    if not _PATH_RE.match(path):
        raise ValueError(f"{path!r} is not a path like 'data.items' or 'a[0].b'")


def check_records_path(path: str) -> None:
    """Raise ValueError unless ``path`` is a path or ``"$"``, the body itself. ``$.data`` (a
    JSONPath habit) is refused, not read as a key named ``$``."""
    if path == TOP:
        return
    if not _PATH_RE.match(path) or re.match(r"^\$(?:[.\[]|$)", path):
        raise ValueError(
            f"{path!r} is not a path like 'data.items' or 'a[0].b' ('$' alone is the body itself)"
        )


def json_path(value: Any, path: str) -> Any:
    """The value at ``data.items[0].id``-style ``path`` (``"$"``: ``value`` itself), or None
    where it does not exist. A ``PageFields`` answers for the paths it holds."""
    if isinstance(value, PageFields):
        return value.values.get(path)
    if path == TOP:
        return value
    for name, index in path_tokens(path):
        if index:
            if not isinstance(value, list) or int(index) >= len(value):
                return None
            value = value[int(index)]
        else:
            if not isinstance(value, dict) or name not in value:
                return None
            value = value[name]
    return value
