"""Conditional requests: the validators of the last stored response go with the next request;
a 304, or the same body with ``skip_unchanged``, makes the run ``unchanged`` with no new row."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from daemon.app import open_daemon
from tests._collect import run, source, wait_for_source_state
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


def count_rows(db: Any) -> int:
    return int(db.execute("SELECT count(*) FROM collected_data").fetchone()[0])


async def test_etag_then_304_is_an_unchanged_run_with_no_new_rows(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    api.route("/rates", json={"EUR": 1}, headers={"ETag": '"v1"'}, times=1)
    api.route("/rates", status=304, headers={"ETag": '"v1"'})
    async with open_daemon(make_settings([source(api, "rates", "/rates")])):
        first = await run(request_reply, db_conn, "rates")
        assert first["status"] == "stored"
        assert db_conn.execute("SELECT etag FROM source_state").fetchall() == [('"v1"',)]
        await wait_for_source_state(nats_url, bus_prefix, "rates", etag='"v1"')
        second = await run(request_reply, db_conn, "rates")
        status = (await request_reply("status")).data
    assert "if-none-match" not in api.hits("/rates")[0].headers
    assert api.hits("/rates")[1].headers["if-none-match"] == '"v1"'
    assert second["status"] == "unchanged"
    assert (second["http_status"], second["rows"], second["pages"]) == (304, 0, 0)
    assert second["note"] == "not modified (HTTP 304)"
    assert second["error_code"] is None
    assert count_rows(db_conn) == 1
    assert b'"unchanged"' in status


async def test_last_modified_is_sent_as_if_modified_since(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    stamp = "Wed, 21 Oct 2026 07:28:00 GMT"
    api.route("/doc", json={"v": 1}, headers={"Last-Modified": stamp}, times=1)
    api.route("/doc", json={"v": 2}, headers={"Last-Modified": "Thu, 22 Oct 2026 07:28:00 GMT"})
    async with open_daemon(make_settings([source(api, "doc", "/doc")])):
        await run(request_reply, db_conn, "doc")
        await wait_for_source_state(nats_url, bus_prefix, "doc", last_modified=stamp)
        second = await run(request_reply, db_conn, "doc")
    assert api.hits("/doc")[1].headers["if-modified-since"] == stamp
    assert second["status"] == "stored"  # the API said it changed: a 200 is stored
    assert count_rows(db_conn) == 2


async def test_conditional_false_sends_no_validators(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    api.route("/rates", json={"EUR": 1}, headers={"ETag": '"v1"'})
    async with open_daemon(make_settings([source(api, "rates", "/rates", conditional=False)])):
        await run(request_reply, db_conn, "rates")
        await wait_for_source_state(nats_url, bus_prefix, "rates", etag='"v1"')
        second = await run(request_reply, db_conn, "rates")
    assert "if-none-match" not in api.hits("/rates")[1].headers
    assert second["status"] == "stored"


async def test_skip_unchanged_does_not_store_the_same_body_twice(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    api.route("/daily", body=b'{"same": true}', content_type="application/json", times=2)
    api.route("/daily", body=b'{"same": false}', content_type="application/json")
    sha = hashlib.sha256(b'{"same": true}').hexdigest()
    async with open_daemon(make_settings([source(api, "daily", "/daily", skip_unchanged=True)])):
        first = await run(request_reply, db_conn, "daily")
        await wait_for_source_state(nats_url, bus_prefix, "daily", body_sha256=sha)
        second = await run(request_reply, db_conn, "daily")
        third = await run(request_reply, db_conn, "daily")
    assert first["status"] == "stored"
    assert second["status"] == "unchanged"
    assert second["note"] == "same body as the last stored run"
    assert (second["http_status"], second["rows"]) == (200, 0)
    assert third["status"] == "stored"
    assert [d for (d,) in db_conn.execute("SELECT data FROM collected_data ORDER BY id")] == [
        {"same": True},
        {"same": False},
    ]


async def test_an_api_without_validators_leaves_no_state_until_it_sends_some(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """Most APIs send no ETag nor Last-Modified: their runs have nothing to remember and
    write no source state. One that starts sending an ETag has it remembered by that very run,
    and sent with the next request."""
    api.route("/plain", json={"n": 1}, times=2)
    api.route("/plain", json={"n": 2}, headers={"ETag": '"v2"'}, times=1)
    api.route("/plain", status=304, headers={"ETag": '"v2"'})
    async with open_daemon(make_settings([source(api, "plain", "/plain")])):
        for _ in range(2):
            assert (await run(request_reply, db_conn, "plain"))["status"] == "stored"
        assert db_conn.execute("SELECT count(*) FROM source_state").fetchone() == (0,)
        third = await run(request_reply, db_conn, "plain")
        await wait_for_source_state(nats_url, bus_prefix, "plain", etag='"v2"')
        fourth = await run(request_reply, db_conn, "plain")
    assert [hit.headers.get("if-none-match") for hit in api.hits("/plain")] == [
        None,
        None,
        None,
        '"v2"',
    ]
    assert (third["status"], fourth["status"]) == ("stored", "unchanged")
