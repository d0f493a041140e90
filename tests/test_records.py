"""Records: one row per record (JSON list at ``records_path``, or JSON lines), and a page that
cannot be split stored whole."""

from __future__ import annotations

from typing import Any

import pytest

from daemon import records
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
        pytest.param("text/plain", {}, id="lines-of-a-vague-type"),
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
    events = source(api, "events", "/events", granularity="record", **extra)
    async with open_daemon(make_settings([events])):
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
    if content_type == "text/html":
        assert data is None
        assert bytes(raw) == body
    else:
        assert data == {"data": {"users": "none"}}
    assert any(r.getMessage() == "write.page_whole" for r in caplog.records)


def test_split_rules() -> None:
    """The pure rules both the fetcher (counting rows) and the writer (storing them) use."""
    page = b'{"a": [{"x": 1} , {"x":12345678901234567.89,"y": [1e400]}]}'
    split = records.split_page("application/json", page, granularity="record", records_path="a")
    # Each record's own bytes, as the API sent them: no number rounded, no space moved.
    assert split == [b'{"x": 1}', b'{"x":12345678901234567.89,"y": [1e400]}']
    for path in ("$", None):
        assert records.split_page(
            "application/json", b"[1, 2.50]", granularity="record", records_path=path
        ) == [b"1", b"2.50"]
    assert (
        records.split_page("application/json", b"[1]", granularity="page", records_path=None)
        is None
    )
    # Not split: one row, the page whole.
    assert records.split_page("text/csv", b"a,b", granularity="record", records_path=None) is None
    lines = "application/x-ndjson"
    split = records.split_page(lines, b"1\n2\n", granularity="record", records_path=None)
    assert split == [b"1", b"2"]
    assert records.split_page(lines, b"1\n2\n", granularity="page", records_path=None) is None
    assert records.split_page(lines, b"1\n{", granularity="record", records_path=None) is None
    values = ["2024-01-02", "2024-03-01", None, 5]
    assert records.cursor_max(None, values) == "2024-03-01"
    assert records.cursor_max(None, [2, 10, 9.5]) == 10
    assert records.cursor_max("2024-01-01", [7, "2023-12-31"]) == "2024-01-01"


def stored(db_conn: Any, run_id: str) -> list[tuple[Any, ...]]:
    """``(page, record, data::text, body)`` of a run's rows: text, so no JSON is decoded here
    (psycopg's jsonb loader cannot read JSON nested 1,000 levels deep)."""
    return list(
        db_conn.execute(
            "SELECT page, record, data::text, body FROM collected_data WHERE run_id = %s"
            " ORDER BY page, record",
            (run_id,),
        ).fetchall()
    )


#: Numbers a Python float cannot hold exactly; jsonb (numeric) keeps each one as written.
EXACT_NUMBERS = [
    ("12345678901234567.89", "12345678901234567.89"),
    ("1e400", "1" + "0" * 400),
    ("1180591620717411303424", "1180591620717411303424"),  # 2**70
    ("0.1000000000000000055511151231257827", "0.1000000000000000055511151231257827"),
    ("-0.000000000000000000000000000001", "-0.000000000000000000000000000001"),
]


async def test_record_granularity_keeps_each_numbers_exact_text(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    records = ", ".join(f'{{"i": {i}, "x": {text}}}' for i, (text, _) in enumerate(EXACT_NUMBERS))
    api.route("/n", body=f'{{"items": [{records}]}}', content_type="application/json")
    numbers = source(api, "numbers", "/n", records_path="items", granularity="record")
    async with open_daemon(make_settings([numbers])):
        done = await run(request_reply, db_conn, "numbers")
    assert (done["status"], done["rows"]) == ("stored", len(EXACT_NUMBERS))
    found = db_conn.execute(
        "SELECT record, data->>'x', body FROM collected_data WHERE run_id = %s ORDER BY record",
        (done["run_id"],),
    ).fetchall()
    assert found == [(i, value, None) for i, (_, value) in enumerate(EXACT_NUMBERS)]


async def test_a_record_with_a_number_jsonb_cannot_hold_lands_in_body_as_sent(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route(
        "/n", body=b'{"items": [{"x": 1e1000000},  {"y" : 2.50}]}', content_type="application/json"
    )
    numbers = source(api, "numbers", "/n", records_path="items", granularity="record")
    async with open_daemon(make_settings([numbers])):
        done = await run(request_reply, db_conn, "numbers")
    assert (done["status"], done["rows"]) == ("stored", 2)
    # The page's records go to body as the API wrote them (jsonb refused one of them).
    assert [(p, r, d, bytes(b)) for p, r, d, b in stored(db_conn, done["run_id"])] == [
        (0, 0, None, b'{"x": 1e1000000}'),
        (0, 1, None, b'{"y" : 2.50}'),
    ]


async def test_json_lines_at_page_granularity_are_one_row_holding_the_page_as_sent(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    page = b'{"e": 1}\n{"e": 2.50}\n\n{"e": 3}\n'
    api.route("/events", body=page, content_type="application/x-ndjson")
    async with open_daemon(make_settings([source(api, "events", "/events")])):
        done = await run(request_reply, db_conn, "events")
    assert (done["status"], done["pages"], done["rows"]) == ("stored", 1, 1)
    ((page_no, record, data, body),) = stored(db_conn, done["run_id"])
    assert (page_no, record, data, bytes(body)) == (0, 0, None, page)


def nested(depth: int) -> bytes:
    """Lists ``depth`` levels deep."""
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("depth", "column"),
    [
        pytest.param(1_000, "data", id="1000-deep"),
        pytest.param(10_000, "data", id="10000-deep"),  # PostgreSQL 15 reads 14,000
        pytest.param(100_000, "body", id="100000-deep-more-than-jsonb-holds"),
    ],
)
async def test_a_deeply_nested_page_is_stored_whole(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    depth: int,
    column: str,
) -> None:
    page = nested(depth)
    api.route("/deep", body=page, content_type="application/json")
    async with open_daemon(make_settings([source(api, "deep", "/deep")])):
        done = await run(request_reply, db_conn, "deep")
        alive = await run(request_reply, db_conn, "deep")  # the daemon still works
    assert (done["status"], done["rows"], alive["status"]) == ("stored", 1, "stored")
    ((page_no, record, data, body),) = stored(db_conn, done["run_id"])
    assert (page_no, record) == (0, 0)
    if column == "data":
        assert (data, body) == (page.decode(), None)
    else:
        assert (data, bytes(body)) == (None, page)


async def test_a_deeply_nested_page_of_records_is_stored_whole_as_one_row(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    page = b'{"items": [{"id": 1}, ' + nested(9_998) + b"]}"  # 10,000 levels in all
    api.route("/deep", body=page, content_type="application/json")
    deep = source(api, "deep", "/deep", records_path="items", granularity="record")
    async with open_daemon(make_settings([deep])):
        done = await run(request_reply, db_conn, "deep")
    assert (done["status"], done["pages"], done["rows"]) == ("stored", 1, 1)
    assert stored(db_conn, done["run_id"]) == [(0, 0, page.decode(), None)]
