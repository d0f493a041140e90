"""JSON nested thousands of levels deep: msgspec raises ``RecursionError`` on it (not
``DecodeError``), and no pure function of the data path may let it out.

A page that cannot be decoded is one row, stored whole — in ``data`` when jsonb can hold it
(PostgreSQL 15 with its default 2 MB stack reads about 13,000 levels), else in ``body`` — and
its pagination fields are absent.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from contracts import Granularity, RawPayload
from daemon import records
from daemon.errors import PaginationError
from daemon.fetcher._pagination import PageState, next_page
from daemon.settings import Pagination
from daemon.writer import _rows

DEPTHS = [1_000, 10_000, 100_000]


def nested(depth: int) -> bytes:
    """Objects and arrays ``depth`` levels deep."""
    return b'{"a": ' * (depth - 1) + b"[]" + b"}" * (depth - 1)


def pages(depth: int) -> dict[str, tuple[bytes, int]]:
    """Where a value ``depth`` levels deep can hide in a page, and the page's depth."""
    deep = nested(depth)
    return {
        "body": (deep, depth),
        "a-field": (b'{"items": [{"id": 1}], "has_more": true, "junk": ' + deep + b"}", depth + 1),
        "a-record": (b'{"items": [{"id": 1}, ' + deep + b'], "has_more": true}', depth + 2),
        "the-pagination-field": (b'{"items": [], "has_more": ' + deep + b"}", depth + 1),
        "a-list-body": (b'[{"id": 1}, ' + deep + b"]", depth + 1),
    }


def stored_as(page: bytes, page_depth: int) -> tuple[str | None, bytes | None]:
    """``(data, body)``: JSON nested deeper than jsonb holds goes to body."""
    return (page.decode(), None) if page_depth <= _rows.JSONB_MAX_DEPTH else (None, page)


PAGINATIONS = [
    None,
    Pagination(kind="page", records_path="items", has_more_path="has_more"),
    Pagination(kind="cursor", cursor_path="next", records_path="items"),
    Pagination(kind="next_url", next_url_path="links[0]", records_path="items"),
    Pagination(kind="offset", records_path="$", limit=1),
]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("granularity", ["page", "record"])
@pytest.mark.parametrize("pagination", PAGINATIONS, ids=lambda p: p.kind if p else "none")
def test_inspect_page_counts_one_row_and_finds_no_fields(
    depth: int, granularity: str, pagination: Pagination | None
) -> None:
    for where, (page, _) in pages(depth).items():
        shape = records.PageShape(
            granularity=granularity,
            records_path="items" if where != "a-list-body" else None,
            pagination=pagination,
            cursor_field="id",
        )
        facts = records.inspect_page(shape, "application/json", page)
        assert (facts.rows, facts.fields, facts.cursor_values) == (1, None, []), where


@pytest.mark.parametrize("depth", DEPTHS)
def test_split_page_keeps_the_page_whole(depth: int) -> None:
    for where, (page, _) in pages(depth).items():
        for ctype in ("application/json", "application/x-ndjson", None):
            split = records.split_page(ctype, page, granularity="record", records_path="items")
            assert split is None, where  # one row
        assert records.decode_json("application/json", page) is None, where


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_deep_json_line_keeps_the_page_whole(depth: int) -> None:
    page = b'{"id": 1}\n' + nested(depth) + b"\n"
    assert (
        records.split_page("application/x-ndjson", page, granularity="record", records_path=None)
        is None
    )
    shape = records.PageShape(granularity="record", cursor_field="id")
    facts = records.inspect_page(shape, "application/x-ndjson", page)
    assert (facts.rows, facts.fields, facts.cursor_values) == (1, None, [])


@pytest.mark.parametrize("depth", DEPTHS)
def test_split_body_stores_deep_json_where_jsonb_can_hold_it(depth: int) -> None:
    limit = _rows.JSONB_MAX_DEPTH
    assert _rows.split_body("application/json", nested(limit)) == (nested(limit).decode(), None)
    assert _rows.split_body("application/json", nested(limit + 1)) == (None, nested(limit + 1))
    for where, (page, page_depth) in pages(depth).items():
        expected = stored_as(page, page_depth)
        assert _rows.split_body("application/json", page) == expected, where
        assert _rows.jsonb_can_hold("application/json", page) is (expected[0] is not None), where


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(b"[" * 2000 + b"1," + b"]" * 2000, id="trailing-comma"),
        pytest.param(b"[" * 2000 + b"]" * 1999, id="unclosed"),
        pytest.param(b"[" * 2000 + b"]" * 2001, id="closed-twice"),
        pytest.param(b"[" * 2000 + b"}" * 2000, id="mismatched"),
        pytest.param(b'{"a":' * 2000 + b"1" + b"}" * 1999 + b"]", id="mismatched-last"),
        pytest.param(b'{"a":' * 2000 + b'"x\\u0000y"' + b"}" * 2000, id="nul-escape"),
        pytest.param(b'{"a":' * 2000 + b'"\\ud800"' + b"}" * 2000, id="lone-surrogate"),
        pytest.param(b'{"a":' * 2000 + b'"\\udc00\\ud800"' + b"}" * 2000, id="reversed-pair"),
        pytest.param(b'{"a":' * 2000 + b'"\xff"' + b"}" * 2000, id="invalid-utf-8"),
        pytest.param(b'{"a":' * 2000 + b'"tab\tin string"' + b"}" * 2000, id="control-char"),
        pytest.param(b'{"a":' * 2000 + b"01" + b"}" * 2000, id="leading-zero"),
        pytest.param(b'{"a":' * 2000 + b"tru" + b"}" * 2000, id="bad-literal"),
        pytest.param(b'{"a" 1' + b"[" * 2000 + b"]" * 2000 + b"}", id="missing-colon"),
        pytest.param(b'{"a": 1 "b": ' + b"[" * 2000 + b"]" * 2000 + b"}", id="missing-comma"),
        pytest.param(b"{1: " + b"[" * 2000 + b"]" * 2000 + b"}", id="number-key"),
        pytest.param(b"[" * 2000 + b"]" * 2000 + b" 1", id="two-values"),
        pytest.param(b"[" * 2000 + b"]" * 2000 + b"\x00", id="trailing-nul"),
    ],
)
def test_deep_json_that_is_not_valid_goes_to_body(page: bytes) -> None:
    assert _rows.split_body("application/json", page) == (None, page)
    assert _rows.jsonb_can_hold("application/json", page) is False


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(b" [" * 2000 + b"\t]\r\n" * 2000, id="whitespace"),
        pytest.param(
            b'{"a":' * 2000 + b'"\\ud83d\\ude00 \\" \\\\ \\/ \\n"' + b"}" * 2000, id="escapes"
        ),
        pytest.param(
            b"[" * 2000 + b'-0.5e+10, true, false, null, "\xc3\xa4", {}' + b"]" * 2000, id="scalars"
        ),
    ],
)
def test_deep_json_that_is_valid_goes_to_data(page: bytes) -> None:
    assert _rows.split_body("application/json", page) == (page.decode(), None)


def payload(granularity: Granularity, body: bytes, **extra: Any) -> RawPayload:
    return RawPayload(
        run_id="r",
        source="s",
        scheduled_for=datetime(2026, 1, 1, tzinfo=UTC),
        fetched_at=datetime(2026, 1, 1, tzinfo=UTC),
        url="http://api.test/",
        status_code=200,
        content_type="application/json",
        body=body,
        granularity=granularity,
        records_path="items",
        **extra,
    )


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("granularity", ["page", "record"])
def test_data_rows_and_rows_of_file_store_the_page_whole(
    depth: int, granularity: Granularity
) -> None:
    for where, (page, page_depth) in pages(depth).items():
        event = payload(granularity, page)
        ((*head, data, body),) = _rows.data_rows(event, page)
        assert head[2:4] == [0, 0], where  # page 0, record 0
        assert (data, body) == stored_as(page, page_depth), where
        rows, large = _rows.rows_of_file(event, io.BytesIO(page))
        if granularity == "record":
            assert (len(rows), large) == (1, []), where
        else:
            assert rows == [], where
            column = "data" if stored_as(page, page_depth)[0] is not None else "body"
            assert [row.column for row in large] == [column], where


@pytest.mark.parametrize(
    "pagination",
    [
        Pagination(kind="cursor", cursor_path="next"),
        Pagination(kind="next_url", next_url_path="next"),
        Pagination(kind="link"),
    ],
    ids=lambda p: p.kind,
)
def test_a_page_without_fields_ends_a_walk_that_reads_the_body(pagination: Pagination) -> None:
    assert next_page(pagination, PageState(), httpx.URL("http://a/"), httpx.Headers(), None) is None


def test_a_page_without_fields_ends_a_page_walk_with_an_error_naming_records_path() -> None:
    pagination = Pagination(kind="page", records_path="items")
    with pytest.raises(PaginationError, match="no list of records at records_path 'items'") as exc:
        next_page(pagination, PageState(), httpx.URL("http://a/"), httpx.Headers(), None)
    assert exc.value.code == "pagination_no_records"
