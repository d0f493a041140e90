"""Records: one row per record (JSON list at ``records_path``, or JSON lines), and a page that
cannot be split stored whole."""

from __future__ import annotations

from typing import Any

import pytest

from daemon import _records
from daemon.app import open_daemon
from tests._collect import data_rows, run, source
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


async def test_record_granularity_lands_one_row_per_record_across_pages(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/users", json={"data": {"users": [{"id": 1}, {"id": 2}]}}, times=1)
    api.route("/users", json={"data": {"users": [{"id": 3}]}}, times=1)
    api.route("/users", json={"data": {"users": []}})
    users = source(
        api,
        "users",
        "/users",
        records_path="data.users",
        granularity="record",
        pagination={"kind": "page"},
    )
    async with open_daemon(make_settings([users])):
        done = await run(request_reply, db_conn, "users")
    assert done["status"] == "stored"
    assert (done["pages"], done["rows"]) == (3, 3)
    assert [(p, r, d) for p, r, d, _ in data_rows(db_conn, done["run_id"])] == [
        (0, 0, {"id": 1}),
        (0, 1, {"id": 2}),
        (1, 0, {"id": 3}),
    ]


@pytest.mark.parametrize(
    ("content_type", "extra"),
    [
        pytest.param("application/x-ndjson", {}, id="x-ndjson"),
        pytest.param("application/jsonl; charset=utf-8", {}, id="jsonl"),
        pytest.param("text/plain", {"granularity": "record"}, id="record-granularity"),
    ],
)
async def test_json_lines_land_one_row_per_line(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    content_type: str,
    extra: dict[str, Any],
) -> None:
    api.route(
        "/events",
        body='{"e": 1}\n{"e": 2, "s": "x\\u0000y"}\n\n{"e": 3}\n',
        content_type=content_type,
    )
    async with open_daemon(make_settings([source(api, "events", "/events", **extra)])):
        done = await run(request_reply, db_conn, "events")
    assert done["status"] == "stored"
    assert (done["pages"], done["rows"]) == (1, 3)
    found = data_rows(db_conn, done["run_id"])
    assert [(p, r) for p, r, _, _ in found] == [(0, 0), (0, 1), (0, 2)]
    assert [d for _, _, d, _ in found] == [{"e": 1}, None, {"e": 3}]
    # JSON jsonb cannot hold (\u0000) goes to body, byte for byte, as everywhere else.
    assert bytes(found[1][3]) == b'{"e": 2, "s": "x\\u0000y"}'


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(b"<html>not json</html>", "text/html", id="not-json"),
        pytest.param(b'{"data": {"users": "none"}}', "application/json", id="no-list"),
    ],
)
async def test_a_page_that_cannot_be_split_is_stored_whole(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    body: bytes,
    content_type: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api.route("/users", body=body, content_type=content_type)
    users = source(api, "users", "/users", records_path="data.users", granularity="record")
    async with open_daemon(make_settings([users])):
        done = await run(request_reply, db_conn, "users")
    assert done["status"] == "stored"
    assert (done["pages"], done["rows"]) == (1, 1)
    ((page, record, data, raw),) = data_rows(db_conn, done["run_id"])
    assert (page, record) == (0, 0)
    stored = raw if data is None else None
    if content_type == "text/html":
        assert bytes(stored) == body
    else:
        assert data == {"data": {"users": "none"}}
    assert any(r.getMessage() == "write.page_whole" for r in caplog.records)


def test_split_rules() -> None:
    """The pure rules both the fetcher (counting rows) and the writer (storing them) use."""
    split = _records.split_page(
        "application/json", b'{"a": [{"x": 1}, {"x": 2}]}', granularity="record", records_path="a"
    )
    assert split is not None
    assert split.texts == [b'{"x":1}', b'{"x":2}']
    assert (
        _records.split_page("application/json", b"[1]", granularity="page", records_path=None)
        is None
    )
    assert _records.row_count("text/csv", b"a,b", granularity="record", records_path=None) == 1
    assert (
        _records.row_count("application/x-ndjson", b"1\n2\n", granularity="page", records_path=None)
        == 2
    )
    assert (
        _records.row_count("application/x-ndjson", b"1\n{", granularity="page", records_path=None)
        == 1
    )
    values = [{"u": "2024-01-02"}, {"u": "2024-03-01"}, {"v": 1}, {"u": 5}]
    assert _records.cursor_max(None, values, "u") == "2024-03-01"
    assert _records.cursor_max(None, [{"n": 2}, {"n": 10}, {"n": 9.5}], "n") == 10
