"""Dead-letter replays never lose data: rows are content-addressed.

A replay of a failed incremental run asks the API from the source's current cursor, which a
later run may have moved: the replay then fetches other records at the same (page, record)
than the first attempt stored. Those are stored beside the first ones, so the cursor saved with
them never refers to records that were dropped. Identical content is still stored once.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from daemon.app import open_daemon
from tests._collect import FAST_RETRY, FINAL, run, run_row, source, wait_for_source_state
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


def changes_source(api: LocalAPI) -> dict[str, Any]:
    return source(
        api,
        "changes",
        "/changes",
        records_path="items",
        granularity="record",
        pagination={"kind": "page"},
        incremental={"field": "id", "param": "since"},
        retries=FAST_RETRY,
    )


def pages(api: LocalAPI, *records: list[dict[str, Any]] | int) -> None:
    """Script the next answers of ``/changes``: a list of records is a page, an int that many
    HTTP 500s."""
    for answer in records:
        if isinstance(answer, int):
            api.route("/changes", status=500, body="down", times=answer)
        else:
            api.route("/changes", json={"items": answer}, times=1)


def stored(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return [data for (data,) in db.execute("SELECT data FROM collected_data ORDER BY id")]


def cursor(db: psycopg.Connection[Any]) -> Any:
    row = db.execute("SELECT cursor FROM source_state WHERE source = 'changes'").fetchone()
    return None if row is None else row[0]


def assert_cursor_not_ahead(db: psycopg.Connection[Any]) -> None:
    """The source's saved state never gets ahead of the rows stored."""
    saved = cursor(db)
    assert saved is None or saved <= max(record["id"] for record in stored(db)), stored(db)


async def replay(
    request_reply: Requester, db: psycopg.Connection[Any], run_id: str, number: int
) -> dict[str, Any]:
    """Replay the run's dead letter (``coleta dlq replay``); its record once it ends."""
    await request_reply("dlq.replay", {"run_id": run_id})

    def done() -> dict[str, Any] | None:
        row = run_row(db, run_id)
        return row if row and row["replay"] == number and row["status"] in FINAL else None

    result: dict[str, Any] = await wait_for(done, what=f"replay {number} of {run_id}")
    return result


async def test_a_replay_that_fetches_newer_records_stores_them_all(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
    bus_prefix: str,
) -> None:
    pages(
        api,
        # The first run: page 1 stored, page 2 fails until its retries are exhausted.
        [{"id": 1, "v": "a"}, {"id": 2, "v": "a"}],
        3,
        # The next run: the records changed, and there is a third.
        [{"id": 1, "v": "b"}, {"id": 2, "v": "b"}],
        [{"id": 3, "v": "b"}],
        [],
        # The replay of the first run, since 3: a fourth record at the first one's place.
        [{"id": 4, "v": "c"}],
        [],
    )
    async with open_daemon(make_settings([changes_source(api)])):
        first = await run(request_reply, db_conn, "changes")
        assert first["status"] == "failed"
        assert_cursor_not_ahead(db_conn)
        second = await run(request_reply, db_conn, "changes")
        assert second["status"] == "stored"
        assert_cursor_not_ahead(db_conn)
        await wait_for_source_state(nats_url, bus_prefix, "changes", cursor=3)
        again = await replay(request_reply, db_conn, first["run_id"], 1)
    assert again["status"] == "stored"
    assert [",".join(hit.query.get("since", ["-"])) for hit in api.hits("/changes")] == [
        *["-"] * 4,
        *["-"] * 3,
        *["3"] * 2,
    ]
    # Every record the API ever returned is stored, and the cursor is among them.
    assert sorted(stored(db_conn), key=lambda r: (r["id"], r["v"])) == [
        {"id": 1, "v": "a"},
        {"id": 1, "v": "b"},
        {"id": 2, "v": "a"},
        {"id": 2, "v": "b"},
        {"id": 3, "v": "b"},
        {"id": 4, "v": "c"},
    ]
    assert cursor(db_conn) == 4
    assert_cursor_not_ahead(db_conn)
    # The replay's row sits beside the first attempt's, at the same place, with its number.
    assert db_conn.execute(
        "SELECT replay, data FROM collected_data WHERE run_id = %s AND page = 0 AND record = 0"
        " ORDER BY replay",
        (first["run_id"],),
    ).fetchall() == [(0, {"id": 1, "v": "a"}), (1, {"id": 4, "v": "c"})]


async def test_replays_that_fetch_the_same_records_store_nothing_twice(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    records = [{"id": 1}, {"id": 2}]
    pages(api, records, 3, records, 3, records, [{"id": 3}], [])
    async with open_daemon(make_settings([changes_source(api)])):
        first = await run(request_reply, db_conn, "changes")
        assert first["status"] == "failed"
        assert (await replay(request_reply, db_conn, first["run_id"], 1))["status"] == "failed"
        assert (await replay(request_reply, db_conn, first["run_id"], 2))["status"] == "stored"
    assert len(api.hits("/changes")) == 4 + 4 + 3
    found = db_conn.execute(
        "SELECT page, record, data, replay FROM collected_data ORDER BY page, record"
    ).fetchall()
    assert found == [(0, 0, {"id": 1}, 0), (0, 1, {"id": 2}, 0), (1, 0, {"id": 3}, 2)]
    assert cursor(db_conn) == 3
