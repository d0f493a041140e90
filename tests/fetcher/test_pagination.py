"""Pagination rules: the next page's request, the stop conditions, loops refused."""

from __future__ import annotations

import functools
from typing import Any

import httpx
import msgspec
import pytest

from daemon import records
from daemon.errors import PaginationError
from daemon.fetcher._pagination import (
    PageState,
    first_page_params,
    next_page,
    records_of,
    set_param,
)
from daemon.jsonpath import json_path
from daemon.records import PageShape, decode_json, inspect_page
from daemon.settings import Pagination

URL = httpx.URL("https://api.example/items?q=x")
NO_HEADERS = httpx.Headers()


def p(**kw: Any) -> Pagination:
    return msgspec.convert(kw, Pagination)


def follow(
    pagination: Pagination, bodies: list[Any], headers: list[dict[str, str]] | None = None
) -> list[str]:
    """The URLs a run would request, given the bodies the API answers with."""
    state = PageState()
    url = URL.copy_merge_params(first_page_params(pagination))
    urls = [str(url)]
    for i, body in enumerate(bodies):
        nxt = next_page(
            pagination, state, url, httpx.Headers((headers or [{}] * len(bodies))[i]), body
        )
        if nxt is None:
            break
        assert nxt.url is not None
        url = httpx.URL(nxt.url)
        urls.append(nxt.url)
        state = nxt
    return urls


def test_json_path() -> None:
    body = {"data": {"items": [{"id": 7}]}, "meta": None}
    assert json_path(body, "data.items[0].id") == 7
    assert json_path(body, "data.items[3].id") is None
    assert json_path(body, "meta.next") is None
    assert json_path([1, 2], "[1]") == 2


def test_page_numbers_until_an_empty_page() -> None:
    urls = follow(p(kind="page", size_param="per_page", size=2), [[1, 2], [3, 4], []])
    assert urls == [
        "https://api.example/items?q=x&page=1&per_page=2",
        "https://api.example/items?q=x&page=2&per_page=2",
        "https://api.example/items?q=x&page=3&per_page=2",
    ]


def test_offset_limit_stops_on_a_short_page() -> None:
    urls = follow(p(kind="offset", limit=2), [[1, 2], [3]])
    assert urls == [
        "https://api.example/items?q=x&offset=0&limit=2",
        "https://api.example/items?q=x&offset=2&limit=2",
    ]


def test_cursor_from_the_body_until_it_is_null() -> None:
    pag = p(kind="cursor", cursor_path="meta.next", records_path="data")
    bodies = [{"data": [1], "meta": {"next": "abc"}}, {"data": [2], "meta": {"next": None}}]
    assert follow(pag, bodies) == [str(URL), "https://api.example/items?q=x&cursor=abc"]


def test_a_repeating_cursor_is_an_error_not_a_loop() -> None:
    pag = p(kind="cursor", cursor_path="next")
    with pytest.raises(PaginationError, match="cursor 'same' repeats"):
        follow(pag, [{"next": "same"}, {"next": "same"}, {"next": "same"}])


def test_link_header_next() -> None:
    pag = p(kind="link")
    headers = [
        {
            "Link": '<https://api.example/items?page=2>; rel="next", '
            '<https://api.example/items?page=9>; rel="last"'
        },
        {"Link": '<https://api.example/items?page=1>; rel="prev"'},
    ]
    assert follow(pag, [[1], [2]], headers) == [str(URL), "https://api.example/items?page=2"]


def test_relative_next_url_in_the_body_and_repeat_detection() -> None:
    pag = p(kind="next_url", next_url_path="links.next")
    assert follow(pag, [{"links": {"next": "/items?page=2"}}, {"links": {}}]) == [
        str(URL),
        "https://api.example/items?page=2",
    ]
    with pytest.raises(PaginationError, match="repeats"):
        follow(pag, [{"links": {"next": "/a"}}, {"links": {"next": "/a"}}])


def test_has_more_flag_total_and_max_pages_stop() -> None:
    assert len(follow(p(kind="page", has_more_path="more"), [{"more": True}, {"more": False}])) == 2
    pag = p(kind="page", records_path="items", total_path="total")
    assert (
        len(
            follow(pag, [{"items": [1, 2], "total": 3}, {"items": [3], "total": 3}, {"items": [9]}])
        )
        == 2
    )
    assert len(follow(p(kind="page", max_pages=3), [[1]] * 10)) == 3


def test_records_of() -> None:
    assert records_of([1], None) == [1]
    assert records_of({"a": {"b": [2]}}, p(kind="page", records_path="a.b")) == [2]
    assert records_of({"a": 1}, p(kind="page", records_path="a")) is None


def test_state_round_trips_for_resuming_after_a_failure() -> None:
    state = PageState(page=4, url="https://x/y?page=5", records_seen=40, seen=["cursor:a"])
    assert msgspec.json.decode(msgspec.json.encode(state), type=PageState) == state


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "cursor"}, "cursor_path: required when kind = 'cursor'"),
        ({"kind": "next_url"}, "next_url_path: required when kind = 'next_url'"),
        ({"kind": "page", "records_path": "a..b"}, "records_path: 'a..b' is not a path"),
    ],
)
def test_bad_pagination_config_names_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        p(**config)


@pytest.mark.parametrize(
    ("url", "name", "value", "expected"),
    [
        ("http://h/p?a=1&page=2&d=%20&e=x%2Fy", "page", "3", "http://h/p?a=1&page=3&d=%20&e=x%2Fy"),
        ("http://h/p?a=1", "cursor", "ab+/=:c d", "http://h/p?a=1&cursor=ab%2B%2F%3D%3Ac+d"),
        ("http://h/p", "page", "3", "http://h/p?page=3"),
        ("http://h/p?page=1&x=y&page=2#top", "page", "9", "http://h/p?page=9&x=y#top"),
        ("http://h/p?page%5Bn%5D=1", "page[n]", "2", "http://h/p?page%5Bn%5D=2"),
    ],
)
def test_the_next_page_url_changes_one_parameter_and_keeps_the_rest_byte_for_byte(
    url: str, name: str, value: str, expected: str
) -> None:
    assert set_param(httpx.URL(url), name, value) == expected
    # What the API reads is what httpx would have sent.
    assert httpx.URL(expected).params == httpx.URL(url).copy_set_param(name, value).params


PAGINATIONS = [
    Pagination(kind="page", records_path="items", has_more_path="has_more"),
    Pagination(kind="page", has_more_path="meta.more", total_path="meta.total"),
    Pagination(kind="offset", records_path="data.rows", limit=2),
    Pagination(kind="cursor", cursor_path="meta.next", records_path="items"),
    Pagination(kind="next_url", next_url_path="links.next"),
    Pagination(kind="next_url", next_url_path="links[0]"),
    Pagination(kind="page", records_path="data", has_more_path="data.more"),
    Pagination(kind="offset", records_path="$", limit=3),
    Pagination(kind="page", records_path="items[0]", total_path="meta.total"),
]
BODIES = [
    b'{"items": [{"a": 1}, {"a": 2}], "has_more": true, "meta": {"more": false, "total": 2}}',
    b'{"items": [], "has_more": false, "data": {"rows": [1, 2], "more": true}}',
    b'{"meta": {"next": "c2", "total": 9}, "items": [1], "links": {"next": "/p?page=2"}}',
    b'{"meta": {"next": null}, "items": {"not": "a list"}, "links": ["/first"]}',
    b'{"meta": [1, 2], "data": {"rows": "x"}}',
    b"[1, 2, 3]",
    b'[{"a": 1}]',
    b'"just a string"',
    b"42",
    b"not json at all",
    b'{"items": [1, 2], "has_more": tru',
    b'{"items": [[1], [2]], "meta": {"total": 4}}',
    b"[" * 5000 + b"]" * 5000,
    b"",
]


@pytest.mark.parametrize("pagination", PAGINATIONS)
def test_next_page_reads_the_same_from_the_page_fields_as_from_the_whole_body(
    pagination: Pagination,
) -> None:
    state = PageState(page=1, records_seen=3)
    shape = PageShape(records_path=pagination.records_path, pagination=pagination)
    # One pass over the page, unless a path has an index or runs through another's value.
    walked = "[" in f"{pagination.next_url_path}{pagination.records_path}" or (
        pagination.records_path == "data"
    )
    locate = records._locator(*records._paths(shape))
    assert isinstance(locate, functools.partial) == walked
    for body in BODIES:
        whole = decode_json("application/json", body)
        fields = inspect_page(shape, "application/json", body).fields
        try:
            expected: Any = next_page(pagination, state, URL, NO_HEADERS, whole)
        except PaginationError as exc:
            expected = str(exc)
        try:
            got: Any = next_page(pagination, state, URL, NO_HEADERS, fields)
        except PaginationError as exc:
            got = str(exc)
        assert got == expected, body
