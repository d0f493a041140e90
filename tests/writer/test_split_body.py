"""Where a response body is stored: the ``data`` jsonb column or the ``body`` bytea column."""

from __future__ import annotations

import pytest

from daemon.writer._rows import split_body
from tests.writer._bodies import JSON_BODIES, OTHER_BODIES


@pytest.mark.parametrize(("content_type", "body"), JSON_BODIES)
def test_json_goes_to_data_unchanged(content_type: str | None, body: bytes) -> None:
    assert split_body(content_type, body) == (body.decode("utf-8"), None)


@pytest.mark.parametrize(("content_type", "body"), OTHER_BODIES)
def test_anything_else_goes_to_body_byte_for_byte(content_type: str | None, body: bytes) -> None:
    assert split_body(content_type, body) == (None, body)


@pytest.mark.parametrize("content_type", ["application/json", None])
def test_empty_body(content_type: str | None) -> None:
    assert split_body(content_type, b"") == (None, b"")


@pytest.mark.parametrize("content_type", ["application/json", None])
def test_json_with_invalid_utf8_goes_to_body(content_type: str | None) -> None:
    body = b'{"a": "\xff"}'
    assert split_body(content_type, body) == (None, body)
