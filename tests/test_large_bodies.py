"""Bodies larger than a NATS message: carried by the object store and streamed into
PostgreSQL — stored whole and unaltered."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
import psycopg
import pytest
from psycopg import sql

from daemon import writer
from daemon._db import apply_migrations
from daemon.app import open_daemon
from daemon.writer import _copy_large, _jsonb_can_hold, _LargeRow, split_body
from tests._collect import run, source
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI
from tests.test_split_body import test_anything_else_goes_to_body_byte_for_byte as _to_body
from tests.test_split_body import test_json_goes_to_data_unchanged as _to_data

pytestmark = pytest.mark.anyio

MB = 1_000_000


def big_json(size: int) -> bytes:
    """A JSON array of about ``size`` bytes whose records hold what a careless copy would
    change: escapes, a backslash, non-ASCII text, and tabs and newlines between tokens."""
    record = (
        '{"id": %d,\t"name": "r\\u00e9cord %d — ä 😀",\n "path": "C:\\\\dir\\\\file",'
        ' "pad": "' + "x" * 120 + '"}'
    )
    count = size // len(record.encode())
    return ("[\n" + ",\r\n".join(record % (i, i) for i in range(count)) + "\n]").encode()


def _cases(test: Any) -> Iterator[tuple[str | None, bytes]]:
    for mark in test.pytestmark:
        if mark.name == "parametrize":
            for case in mark.args[1]:
                yield case.values


@pytest.mark.parametrize(
    ("content_type", "body"), [*_cases(_to_data), *_cases(_to_body), ("application/json", b"")]
)
def test_a_large_body_is_judged_as_split_body_judges_it(
    content_type: str | None, body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # UTF-8 is checked a slice at a time: slices of 3 bytes cut multi-byte characters.
    monkeypatch.setattr(writer, "_COPY_CHUNK", 3)
    assert _jsonb_can_hold(content_type, body) == (split_body(content_type, body)[0] is not None)


async def test_a_large_json_body_lands_whole_in_data(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    body = big_json(20 * MB)
    api.route("/big", body=body, content_type="application/json")
    async with open_daemon(make_settings([source(api, "big", "/big", timeout_s=60)])) as daemon:
        done = await run(request_reply, db_conn, "big")
        assert daemon.bus.bodies is not None
        with pytest.raises(nats.js.errors.NotFoundError):
            await daemon.bus.bodies.get(f"{done['run_id']}/0")  # removed once stored
    assert (done["status"], done["rows"], done["bytes"]) == ("stored", 1, len(body))
    stored = db_conn.execute(
        "SELECT data = %s::jsonb, body IS NULL, jsonb_array_length(data) FROM collected_data",
        (body.decode(),),
    ).fetchall()
    assert stored == [(True, True, body.count(b'{"id"'))]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param("application/json", big_json(3 * MB)[:-1] + b',"\\u0000"]', id="nul-escape"),
        pytest.param("application/json", big_json(3 * MB)[:-1] + b',"\\ud800"]', id="surrogate"),
        pytest.param("application/json", big_json(3 * MB)[:-1] + b',"\xff"]', id="bad-utf-8"),
        pytest.param("application/json", big_json(3 * MB)[:-2], id="truncated"),
        pytest.param("text/csv", b"a,b\t\\N\r\n" * 400_000, id="csv-with-copy-escapes"),
    ],
)
async def test_a_large_body_jsonb_cannot_hold_lands_in_body_byte_for_byte(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    content_type: str,
    body: bytes,
) -> None:
    api.route("/odd", body=body, content_type=content_type)
    async with open_daemon(make_settings([source(api, "odd", "/odd", timeout_s=60)])):
        done = await run(request_reply, db_conn, "odd")
    assert done["status"] == "stored"
    stored = db_conn.execute("SELECT data, body, content_type FROM collected_data").fetchall()
    assert stored == [(None, body, content_type)]


async def test_a_large_row_is_inserted_once(database_url: str, db_schema: str) -> None:
    body = big_json(2 * MB)
    values = ("big@1", "big", 0, 0, datetime.now(UTC), datetime.now(UTC), 200, "application/json")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await apply_migrations(conn, db_schema)  # type: ignore[arg-type]
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(db_schema)))
        with tempfile.TemporaryFile() as file:
            file.write(body)
            row = _LargeRow(values, "data", file, len(body))
            for _ in range(2):  # a batch written again, holding the row twice
                async with conn.transaction(), conn.cursor() as cur:
                    await _copy_large(cur, [row, row])
        found = await conn.execute("SELECT count(*), min(data::text) FROM collected_data")
        count, text = await found.fetchone() or (0, None)
        # The temporary table went with each transaction.
        missing = await conn.execute("SELECT to_regclass('pg_temp.coleta_large_body')")
        assert await missing.fetchone() == (None,)
    assert count == 1
    assert text is not None
    assert text.startswith('[{"id": 0, "pad": "xxx')  # jsonb's own text: keys by length
    assert '"name": "récord 0 — ä 😀", "path": "C:\\\\dir\\\\file"}, {"id": 1,' in text
