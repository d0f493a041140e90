"""Paginated APIs end to end: one row per page under one run, retries resume at the failed
page, and a repeating cursor fails the run instead of looping."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import psycopg
import pytest

from daemon.app import open_daemon
from daemon.fetcher._pagination import PageState
from daemon.fetcher._progress import Progress
from tests._collect import FAST_RETRY, data_rows, kv_value, run, source
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


def queries(api: LocalAPI, path: str, name: str) -> list[str]:
    """The value of query parameter ``name`` in each request to ``path``, in order."""
    return [",".join(hit.query.get(name, ["-"])) for hit in api.hits(path)]


async def test_page_numbers_land_one_row_per_page_with_params_kept(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/items", json={"items": [1, 2]}, times=1)
    api.route("/items", json={"items": [3]}, times=1)
    api.route("/items", json={"items": []})
    paged = source(
        api,
        "paged",
        "/items?fixed=1",
        params={"who": "{source}"},
        pagination={"kind": "page", "size_param": "per_page", "size": 2},
        records_path="items",
    )
    async with open_daemon(make_settings([paged])):
        done = await run(request_reply, db_conn, "paged")
    assert done["status"] == "stored"
    assert (done["pages"], done["rows"]) == (3, 3)
    assert queries(api, "/items", "page") == ["1", "2", "3"]
    # The first request's templated params and the URL's own query go on every page.
    for hit in api.hits("/items"):
        assert hit.query["who"] == ["paged"]
        assert hit.query["fixed"] == ["1"]
        assert hit.query["per_page"] == ["2"]
    assert [(p, r, d) for p, r, d, _ in data_rows(db_conn, done["run_id"])] == [
        (0, 0, {"items": [1, 2]}),
        (1, 0, {"items": [3]}),
        (2, 0, {"items": []}),
    ]


@pytest.mark.parametrize(
    ("kind", "pagination", "pages"),
    [
        pytest.param(
            "offset",
            {"kind": "offset", "limit": 2},
            [({"data": [1, 2]}, {}), ({"data": [3]}, {})],
            id="offset",
        ),
        pytest.param(
            "cursor",
            {"kind": "cursor", "cursor_path": "meta.next", "cursor_param": "after"},
            [
                ({"data": [1], "meta": {"next": "c1"}}, {}),
                ({"data": [2], "meta": {"next": "c2"}}, {}),
                ({"data": [3], "meta": {"next": None}}, {}),
            ],
            id="cursor",
        ),
        pytest.param(
            "link",
            {"kind": "link"},
            [
                ({"data": [1]}, {"Link": '</things?p=2>; rel="next"'}),
                ({"data": [2]}, {"Link": '</things?p=1>; rel="prev"'}),
            ],
            id="link",
        ),
        pytest.param(
            "next_url",
            {"kind": "next_url", "next_url_path": "links.next"},
            [
                ({"data": [1], "links": {"next": "/things?p=2"}}, {}),
                ({"data": [2], "links": {"next": "/things?p=3"}}, {}),
                ({"data": [3], "links": {}}, {}),
            ],
            id="next_url",
        ),
    ],
)
async def test_each_pagination_kind_lands_one_row_per_page(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    kind: str,
    pagination: dict[str, Any],
    pages: list[tuple[dict[str, Any], dict[str, str]]],
) -> None:
    for body, headers in pages:
        api.route("/things", json=body, headers=headers, times=1)
    paged = source(api, "paged", "/things", pagination=pagination, records_path="data")
    async with open_daemon(make_settings([paged])):
        done = await run(request_reply, db_conn, "paged")
    assert done["status"] == "stored", done
    assert (done["pages"], done["rows"]) == (len(pages), len(pages))
    assert [d for _, _, d, _ in data_rows(db_conn, done["run_id"])] == [b for b, _ in pages]
    hits = api.hits("/things")
    assert len(hits) == len(pages)
    if kind == "offset":
        assert queries(api, "/things", "offset") == ["0", "2"]
    elif kind == "cursor":
        assert queries(api, "/things", "after") == ["-", "c1", "c2"]
    else:
        assert queries(api, "/things", "p")[1:] == [str(i + 2) for i in range(len(pages) - 1)]


async def test_a_failure_on_page_2_retries_from_page_2(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
    bus_prefix: str,
) -> None:
    api.route("/items", json={"items": [1]}, times=1)
    api.route("/items", json={"items": [2]}, times=1)
    api.route("/items", status=503, body="busy", times=1)
    api.route("/items", json={"items": [3]}, times=1)
    api.route("/items", json={"items": []})
    paged = source(
        api,
        "paged",
        "/items",
        pagination={"kind": "page", "first_page": 0},
        records_path="items",
        retries=FAST_RETRY,
    )
    async with open_daemon(make_settings([paged])):
        done = await run(request_reply, db_conn, "paged")
        key = hashlib.sha256(f"{done['run_id']}/r0".encode()).hexdigest()
        assert await kv_value(nats_url, f"{bus_prefix}_progress", key) is None  # forgotten
    assert done["status"] == "stored"
    assert done["attempts"] == 2
    assert (done["pages"], done["rows"]) == (4, 4)
    # Pages 0 and 1 were fetched once; page 2 failed and was asked again, alone.
    assert queries(api, "/items", "page") == ["0", "1", "2", "2", "3"]
    assert [(p, d) for p, _, d, _ in data_rows(db_conn, done["run_id"])] == [
        (0, {"items": [1]}),
        (1, {"items": [2]}),
        (2, {"items": [3]}),
        (3, {"items": []}),
    ]
    bytes_expected = sum(len(b) for b in (b'{"items": [1]}', b'{"items": [2]}', b'{"items": [3]}'))
    assert done["bytes"] == bytes_expected + len(b'{"items": []}')


async def test_a_repeating_cursor_fails_the_run_with_pagination_loop(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/loop", json={"data": [1], "next": "same"})
    looping = source(api, "looping", "/loop", pagination={"kind": "cursor", "cursor_path": "next"})
    async with open_daemon(make_settings([looping])):
        done = await run(request_reply, db_conn, "looping")
    assert done["status"] == "failed"
    assert done["error_code"] == "pagination_loop"
    assert "'same' repeats" in done["error"]
    assert done["attempts"] == 1
    assert len(api.hits("/loop")) == 2  # the first page, then the page the cursor named
    assert [p for p, _, _, _ in data_rows(db_conn, done["run_id"])] == [0]


async def test_a_resumed_page_keeps_credentials_that_progress_never_stores(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/items", json={"items": [1]}, times=1)
    api.route("/items", status=503, body="busy", times=1)
    api.route("/items", json={"items": []})
    paged = source(
        api,
        "paged",
        "/items",
        params={"api_key": "s3cret"},
        pagination={"kind": "page"},
        records_path="items",
        retries=FAST_RETRY,
    )
    async with open_daemon(make_settings([paged])):
        done = await run(request_reply, db_conn, "paged")
    assert done["status"] == "stored"
    assert queries(api, "/items", "page") == ["1", "2", "2"]
    assert queries(api, "/items", "api_key") == ["s3cret"] * 3


def test_progress_is_kept_redacted_and_restored_from_the_first_request() -> None:
    first = httpx.URL("http://u:pw@api.test/items?api_key=s3cret&page=1")
    progress = Progress(
        state=PageState(
            page=2,
            url="http://u:pw@api.test/items?api_key=s3cret&page=3",
            seen=["url:http://u:pw@api.test/items?api_key=s3cret&page=2", "cursor:c1"],
        ),
        run_bytes=10,
        run_rows=4,
        cursor="2026-01-01",
    )
    stored = progress.dump()
    assert b"s3cret" not in stored
    assert b"pw" not in stored
    back = Progress.load(stored, first)
    assert back.state.url == "http://u:pw@api.test/items?api_key=s3cret&page=3"
    assert back.state.seen == ["url:http://u:pw@api.test/items?api_key=s3cret&page=2", "cursor:c1"]
    assert (back.page, back.run_bytes, back.run_rows, back.cursor) == (2, 10, 4, "2026-01-01")


async def test_offset_pagination_over_a_body_that_is_the_list(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/rows", json=[1, 2], times=1)
    api.route("/rows", json=[3])
    rows = source(api, "rows", "/rows", records_path="$", pagination={"kind": "offset", "limit": 2})
    async with open_daemon(make_settings([rows])):
        done = await run(request_reply, db_conn, "rows")
    assert (done["status"], done["pages"]) == ("stored", 2)
    assert queries(api, "/rows", "offset") == ["0", "2"]
    assert [d for _, _, d, _ in data_rows(db_conn, done["run_id"])] == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("pagination", "records_path", "message"),
    [
        pytest.param(
            {"kind": "offset", "limit": 2},
            "data",
            "page 0: no list of records at records_path 'data': offset pagination needs one",
            id="offset",
        ),
        pytest.param(
            {"kind": "page"},
            None,
            "page 0: no list of records at the top level (the body is not a list)",
            id="page",
        ),
    ],
)
async def test_a_page_walk_over_pages_without_records_fails_instead_of_walking_on(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    pagination: dict[str, Any],
    records_path: str | None,
    message: str,
) -> None:
    api.route("/rows", json={"data": "maintenance", "results": [1, 2]})
    extra = {"records_path": records_path} if records_path else {}
    rows = source(api, "rows", "/rows", pagination=pagination | {"max_pages": 50}, **extra)
    async with open_daemon(make_settings([rows])):
        done = await run(request_reply, db_conn, "rows")
    assert (done["status"], done["error_code"]) == ("failed", "pagination_no_records")
    assert done["error"].startswith(message)
    assert len(api.hits("/rows")) == 1  # not max_pages requests
