"""Bodies larger than a NATS message: spooled to disk, carried by the object store and streamed
into PostgreSQL — stored whole and unaltered, and never in memory in several copies."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import nats.js.errors
import psycopg
import pytest
from psycopg import sql

from contracts import RawPayload, Subjects, encode
from daemon.app import open_daemon
from daemon.errors import FetchPermanent
from daemon.fetcher._client import open_client
from daemon.fetcher._send import send
from daemon.platform.bus import Bus, BusOptions
from daemon.platform.migrate import apply_migrations
from daemon.writer import BATCH_BYTES, _rows
from daemon.writer._rows import LargeRow, copy_large, jsonb_can_hold, split_body
from tests._collect import run, source
from tests._proc import clean_env, coleta, spawn, wait_healthy, write_config
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI
from tests.writer._bodies import JSON_BODIES, OTHER_BODIES

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


#: Built once: five parameters and a test start from it.
BIG_3MB = big_json(3 * MB)


@pytest.mark.parametrize(
    ("content_type", "body"), [*JSON_BODIES, *OTHER_BODIES, ("application/json", b"")]
)
def test_a_large_body_is_judged_as_split_body_judges_it(
    content_type: str | None, body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # UTF-8 is checked a slice at a time: slices of 3 bytes cut multi-byte characters.
    monkeypatch.setattr(_rows, "_COPY_CHUNK", 3)
    assert jsonb_can_hold(content_type, body) == (split_body(content_type, body)[0] is not None)


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
        pytest.param("application/json", BIG_3MB[:-1] + b',"\\u0000"]', id="nul-escape"),
        pytest.param("application/json", BIG_3MB[:-1] + b',"\\ud800"]', id="surrogate"),
        pytest.param("application/json", BIG_3MB[:-1] + b',"\xff"]', id="bad-utf-8"),
        pytest.param("application/json", BIG_3MB[:-2], id="truncated"),
        pytest.param("application/json", BIG_3MB[:-1] + b",1e999999]", id="huge-number"),
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
    now = datetime.now(UTC)
    values = ("big@1", "big", 0, 0, now, now, 200, "application/json", 0)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await apply_migrations(conn, db_schema)
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(db_schema)))
        with tempfile.TemporaryFile() as file:
            file.write(body)
            row = LargeRow(values, "data", file, len(body))
            for _ in range(2):  # a batch written again, holding the row twice
                async with conn.transaction(), conn.cursor() as cur:
                    await copy_large(cur, [row, row])
        found = await conn.execute("SELECT count(*), min(data::text) FROM collected_data")
        count, text = await found.fetchone() or (0, None)
        # The temporary table went with each transaction.
        missing = await conn.execute("SELECT to_regclass('pg_temp.coleta_large_body')")
        assert await missing.fetchone() == (None,)
    assert count == 1
    assert text is not None
    assert text.startswith('[{"id": 0, "pad": "xxx')  # jsonb's own text: keys by length
    assert '"name": "récord 0 — ä 😀", "path": "C:\\\\dir\\\\file"}, {"id": 1,' in text


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status")
def test_a_large_body_is_not_held_in_several_copies(
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    body = big_json(30 * MB)
    api.route("/big", body=body, content_type="application/json")
    config = write_config(
        tmp_path / "coleta.toml",
        f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
        f'[[sources]]\nname = "big"\nurl = "{api.url("/big")}"\nschedule = "0 0 1 1 *"\n'
        "timeout_s = 60\n",
    )
    env = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    with spawn(env, tmp_path / "daemon.log") as daemon:
        wait_healthy(env, daemon.proc, daemon.log)
        idle = _peak_mib(daemon.proc.pid)
        done = coleta("trigger", "big", "--wait", "--wait-timeout", "90", env=env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        peak = _peak_mib(daemon.proc.pid)
    # Once in memory (the writer checks it is JSON) and ~5 MiB of buffers: ~idle + 33 MiB.
    # Gathered, joined, decoded and encoded, as before spooling, it was idle + 208 MiB.
    bound = idle + 2.5 * len(body) / 2**20
    assert peak < bound, f"peak RSS {peak:.0f} MiB, idle {idle:.0f} MiB, body 30 MB"


def _spooled_bytes(pid: int, spool: Path) -> int:
    """Bytes of the files under ``spool`` that process ``pid`` holds open right now."""
    total = 0
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir() if fds.exists() else ():
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(fd).startswith(str(spool)):
                total += fd.stat().st_size
    return total


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/")
async def test_bodies_in_the_object_store_count_against_the_batch_budget(
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    db_conn: psycopg.Connection[Any],
) -> None:
    """Eight payloads of one batch each reference a 30 MB body: written a budget at a time,
    never all eight in hand (in memory or in temporary files) at once."""
    count, size = 8, 30 * MB
    spool = tmp_path / "spool"
    spool.mkdir()
    config = write_config(
        tmp_path / "coleta.toml", f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
    )
    env = clean_env(
        NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config), TMPDIR=str(spool)
    )
    # A first start declares the streams and shows what the daemon weighs at rest.
    with spawn(env, tmp_path / "idle.log") as daemon:
        wait_healthy(env, daemon.proc, daemon.log)
        idle = _peak_mib(daemon.proc.pid)
        assert daemon.stop() == 0
    digests = {}
    options = BusOptions(max_age_s=24 * 3600.0, duplicate_window_s=3600.0)
    async with Bus.open(nats_url, Subjects(bus_prefix), options) as bus:
        for i in range(count):
            digest = hashlib.sha256()
            with tempfile.TemporaryFile() as file:
                for _ in range(size // MB):  # random bytes: they go to `body`
                    chunk = os.urandom(MB)
                    file.write(chunk)
                    digest.update(chunk)
                await bus.put_body(f"big@{i}/0", file)
            digests[f"big@{i}"] = digest.hexdigest()
            now = datetime.now(UTC)
            payload = RawPayload(
                run_id=f"big@{i}",
                source="big",
                scheduled_for=now,
                fetched_at=now,
                url="http://127.0.0.1/big",
                status_code=200,
                content_type="application/octet-stream",
                body=b"",
                body_ref=f"big@{i}/0",
                body_size=size,
            )
            await bus.js.publish(bus.subjects.raw("big"), encode(payload))

    def stored() -> int:
        (count,) = db_conn.execute("SELECT count(*) FROM collected_data").fetchall()
        return int(count[0])

    # Started again, the daemon finds the eight payloads waiting: one fetch takes them all.
    with spawn(env, tmp_path / "daemon.log") as daemon:
        most = 0
        deadline = time.monotonic() + 180
        while stored() < count and time.monotonic() < deadline:
            most = max(most, _spooled_bytes(daemon.proc.pid, spool))
            await anyio.sleep(0.01)
        peak = _peak_mib(daemon.proc.pid)
    found = db_conn.execute(
        "SELECT run_id, length(body), encode(sha256(body), 'hex') FROM collected_data"
    ).fetchall()
    assert sorted(found) == [(run_id, size, digest) for run_id, digest in digests.items()]
    assert 0 < most <= BATCH_BYTES + size, f"{most / MB:.0f} MB of bodies held at once"
    # The budget, one body being checked, and ~20 MiB of buffers (NATS chunks, COPY).
    bound = idle + (BATCH_BYTES + size) / 2**20 + 20
    assert peak < bound, f"peak RSS {peak:.0f} MiB, idle {idle:.0f} MiB"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts /proc/self/fd")
async def test_send_spools_a_body_over_its_limit_and_keeps_a_small_one_in_memory(
    api: LocalAPI,
) -> None:
    body = BIG_3MB
    api.route("/big", body=body, content_type="application/json", times=2)
    api.route("/small", body=body[:1000], content_type="application/json")
    async with open_client() as client:
        small = await send(
            client, client.build_request("GET", api.url("/small")), source="t", max_bytes=10 * MB
        )
        assert (small.spool, small.body, small.size) == (None, body[:1000], 1000)
        assert small.sha256() == hashlib.sha256(body[:1000]).hexdigest()

        before = _open_fds()
        big = await send(
            client,
            client.build_request("GET", api.url("/big")),
            source="t",
            max_bytes=10 * MB,
            spool_over=MB,
        )
        assert big.spool is not None
        assert (big.body, big.size) == (b"", len(body))
        assert big.sha256() == hashlib.sha256(body).hexdigest()  # hashed as it arrived
        assert big.content() == body
        big.close()
        assert _open_fds() == before

        with pytest.raises(FetchPermanent) as too_large:
            await send(
                client,
                client.build_request("GET", api.url("/big")),
                source="t",
                max_bytes=2 * MB,
                spool_over=MB,
            )
        assert too_large.value.code == "response_too_large"
        assert _open_fds() == before  # the partial spool is gone


async def test_paginated_pages_over_a_nats_message_each_land_whole(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    records = big_json(2 * MB).decode()
    pages = [
        f'{{"next": "c1", "data": {records}}}'.encode(),
        f'{{"next": null, "data": {records}}}'.encode(),
    ]
    api.route("/pages", body=pages[0], content_type="application/json", times=1)
    api.route("/pages", body=pages[1], content_type="application/json")
    paged = source(
        api, "paged", "/pages", pagination={"kind": "cursor", "cursor_path": "next"}, timeout_s=60
    )
    async with open_daemon(make_settings([paged])):
        done = await run(request_reply, db_conn, "paged")
    assert (done["status"], done["pages"], done["bytes"]) == ("stored", 2, sum(map(len, pages)))
    assert [hit.query for hit in api.hits("/pages")] == [{}, {"cursor": ["c1"]}]
    stored = db_conn.execute(
        "SELECT page, data = %s::jsonb, body IS NULL FROM collected_data ORDER BY page",
        (pages[0].decode(),),
    ).fetchall()
    assert stored == [(0, True, True), (1, False, True)]
    second = db_conn.execute(
        "SELECT data = %s::jsonb FROM collected_data WHERE page = 1", (pages[1].decode(),)
    ).fetchone()
    assert second == (True,)
