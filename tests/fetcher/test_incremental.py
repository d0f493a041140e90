"""Incremental collection: the largest ``field`` among a stored run's records is the next
run's query parameter, saved with the data it came from."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from daemon.app import open_daemon
from daemon.errors import ConfigError
from daemon.settings import parse_settings
from tests._collect import FAST_RETRY, run, source, wait_for_source_state
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

INCREMENTAL = {"field": "updated_at", "param": "since", "initial": "2026-01-01T00:00:00Z"}


def since(api: LocalAPI, path: str) -> list[str]:
    return [",".join(hit.query.get("since", ["-"])) for hit in api.hits(path)]


async def test_the_second_run_asks_since_the_first_runs_largest_value(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    first_pages = [
        {"items": [{"id": 1, "updated_at": "2026-03-01T10:00:00Z"}]},
        {"items": [{"id": 2, "updated_at": "2026-03-02T09:00:00Z"}, {"id": 3}]},
        {"items": [{"id": 4, "updated_at": "2026-02-28T00:00:00Z"}]},
        {"items": []},
    ]
    for body in first_pages:
        api.route("/changes", json=body, times=1)
    api.route("/changes", json={"items": []})
    changes = source(
        api,
        "changes",
        "/changes",
        records_path="items",
        granularity="record",
        pagination={"kind": "page"},
        incremental=INCREMENTAL,
        retries=FAST_RETRY,
    )
    async with open_daemon(make_settings([changes])):
        first = await run(request_reply, db_conn, "changes")
        assert first["status"] == "stored"
        assert first["rows"] == 4
        (cursor,) = db_conn.execute("SELECT cursor FROM source_state").fetchone()
        assert cursor == "2026-03-02T09:00:00Z"
        await wait_for_source_state(nats_url, bus_prefix, "changes", cursor=cursor)
        second = await run(request_reply, db_conn, "changes")
    assert second["status"] == "stored"
    # The first run starts from `initial`; its later pages keep the parameter.
    assert since(api, "/changes") == ["2026-01-01T00:00:00Z"] * 4 + ["2026-03-02T09:00:00Z"]
    # A run with no records leaves the cursor where it was.
    assert db_conn.execute("SELECT cursor FROM source_state").fetchone() == (cursor,)


async def test_a_failed_run_does_not_move_the_cursor(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    api.route("/changes", json={"items": [{"updated_at": 5}]}, times=1)
    api.route("/changes", json={"items": []}, times=1)
    # The second run sees 7 on its first page, then fails for good on its second.
    api.route("/changes", json={"items": [{"updated_at": 7}]}, times=1)
    api.route("/changes", status=400, body="bad", times=1)
    api.route("/changes", json={"items": []})
    changes = source(
        api,
        "changes",
        "/changes",
        records_path="items",
        pagination={"kind": "page"},
        incremental={"field": "updated_at", "param": "since"},
    )
    async with open_daemon(make_settings([changes])):
        first = await run(request_reply, db_conn, "changes")
        await wait_for_source_state(nats_url, bus_prefix, "changes", cursor=5)
        failed = await run(request_reply, db_conn, "changes")
        third = await run(request_reply, db_conn, "changes")
    assert (first["status"], failed["status"], third["status"]) == ("stored", "failed", "stored")
    # No initial: the first run sends nothing; numbers are sent as JSON numbers. The failed
    # run's 7 never became the cursor: the third run asks again from 5 (never skips a range).
    assert since(api, "/changes") == ["-", "-", "5", "5", "5"]
    assert db_conn.execute("SELECT cursor FROM source_state").fetchone() == (5,)


@contextlib.asynccontextmanager
async def refusing_writes(nats_url: str, bucket: str) -> AsyncIterator[None]:
    """The key-value ``bucket`` takes no writes meanwhile, as while its stream has no leader
    (a cluster node failing over): a put finds no stream for its subject."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(f"KV_{bucket}")).config
        subjects = config.subjects
        config.subjects = [f"$KV.{bucket}-paused.>"]
        await js.update_stream(config)
        try:
            yield
        finally:
            config.subjects = subjects
            await js.update_stream(config)
    finally:
        await nc.close()


async def test_a_cursor_the_writer_could_not_copy_reaches_the_next_run(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The writer copies the cursor to the fetcher's bucket after the commit. A copy that
    failed (the bucket's node failing over) used to wait for the source's next commit, after
    its next run had asked from the old cursor and stored the last range again; it is tried
    again until it succeeds."""
    caplog.set_level(logging.WARNING, logger="coleta.writer")
    api.route("/changes", json={"items": [{"updated_at": 5}]}, times=1)
    api.route("/changes", json={"items": []})
    changes = source(
        api,
        "changes",
        "/changes",
        records_path="items",
        incremental={"field": "updated_at", "param": "since"},
    )
    async with open_daemon(make_settings([changes])):
        async with refusing_writes(nats_url, f"{bus_prefix}_sources"):
            first = await run(request_reply, db_conn, "changes")
            await wait_for(
                lambda: [r for r in caplog.records if r.msg == "write.source_state_unpublished"],
                what="the copy refused",
            )
        await wait_for_source_state(nats_url, bus_prefix, "changes", cursor=5)
        second = await run(request_reply, db_conn, "changes")
    assert (first["status"], second["status"]) == ("stored", "stored")
    assert since(api, "/changes") == ["-", "5"]


def test_incremental_without_records_is_a_config_error_naming_the_key() -> None:
    data = {
        "sources": [
            {
                "name": "x",
                "url": "http://127.0.0.1/x",
                "schedule": "0 0 * * *",
                "incremental": {"field": "updated_at", "param": "since"},
            }
        ]
    }
    with pytest.raises(ConfigError, match=r"sources\[0\]\.incremental: needs records_path"):
        parse_settings(data, "test")
