"""Bodies of every kind, and where the writer stores each: ``data`` (jsonb) or ``body``
(bytea). The same cases judge a small body (``split_body``) and a large one."""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["JSON_BODIES", "OTHER_BODIES"]

#: ``(content_type, body)`` that go to ``data`` as they are.
JSON_BODIES: list[Any] = [
    pytest.param("application/json", b'{"EUR": 1.08}', id="object"),
    pytest.param("application/json; charset=utf-8", b"[1, 2, 3]", id="array-with-charset"),
    pytest.param("Application/JSON", b'{"a": 1}', id="type-case-insensitive"),
    pytest.param("application/vnd.api+json", b'{"data": []}', id="vendor-json"),
    pytest.param("application/json", b"123", id="scalar-with-json-type"),
    pytest.param(None, b'{"a": 1}', id="no-type-object"),
    pytest.param(None, b"  \n[1]", id="no-type-array-after-whitespace"),
    pytest.param("", b'{"a": 1}', id="empty-type"),
    pytest.param("text/plain", b'{"a": 1}', id="text-plain-object"),
    pytest.param("application/json", b'{"smile": "\\ud83d\\ude00"}', id="surrogate-pair"),
    pytest.param("application/json", b'{"smile": "\\uD83D\\uDE00"}', id="upper-pair"),
    pytest.param("application/json", '{"smile": "😀", "a": "ä"}'.encode(), id="utf-8"),
    pytest.param("application/json", b'{"path": "C:\\\\ud800"}', id="escaped-backslash"),
]

#: ``(content_type, body)`` that go to ``body``, byte for byte.
OTHER_BODIES: list[Any] = [
    pytest.param("text/plain", b"123", id="text-plain-number"),
    pytest.param(None, b"123", id="no-type-number"),
    pytest.param("text/html", b'{"a": 1}', id="html-that-looks-like-json"),
    pytest.param("text/csv", b"a,b\n1,2\n", id="csv"),
    pytest.param("application/json", b'{"a": ', id="truncated-json"),
    pytest.param(None, b"{not json}", id="brace-but-not-json"),
    pytest.param("application/json", b'{"a": "x\\u0000y"}', id="nul-escape"),
    pytest.param("application/json", b'{"a": "\\ud800"}', id="lone-high-surrogate"),
    pytest.param("application/json", b'{"a": "\\udc00x"}', id="lone-low-surrogate"),
    pytest.param("application/json", b'{"a": "\\ud83dx"}', id="high-then-text"),
    pytest.param("application/octet-stream", b"\xff\xfe\x00\x01", id="binary"),
    pytest.param(None, b"\xff{", id="no-type-invalid-utf-8"),
    pytest.param("application/json", b'\xef\xbb\xbf{"a": 1}', id="utf-8-bom"),
]
