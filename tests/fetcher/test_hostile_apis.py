"""Hostile APIs: flaky, rate-limited, slow, huge or broken — and the dead-letter stream."""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import brotli
import msgspec
import nats
import nats.js.errors
import pytest

from contracts import RawPayload, encode
from daemon.app import open_daemon
from tests._collect import FAST_RETRY, finished, run_row, source, trigger
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


async def test_transient_failures_are_retried_until_stored(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/flaky", status=503, body="busy", times=2)
    api.route("/flaky", json={"ok": 1})
    async with open_daemon(make_settings([source(api, "flaky", "/flaky", retries=FAST_RETRY)])):
        run_id = await trigger(request_reply, "flaky")
        row = await wait_for(lambda: finished(db_conn, run_id))
    assert row["status"] == "stored"
    assert row["attempts"] == 3
    assert len(api.hits("/flaky")) == 3
    assert db_conn.execute("SELECT count(*) FROM collected_data").fetchone() == (1,)


async def test_retry_after_is_honoured(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/limited", status=429, headers={"Retry-After": "1"}, times=1)
    api.route("/limited", json={"ok": 1})
    async with open_daemon(make_settings([source(api, "limited", "/limited", retries=FAST_RETRY)])):
        run_id = await trigger(request_reply, "limited")
        started = time.monotonic()
        row = await wait_for(lambda: finished(db_conn, run_id))
    assert row["status"] == "stored"
    first, second = api.hits("/limited")
    assert time.monotonic() - started >= 0.9
    assert first.method == second.method == "GET"


async def test_other_4xx_fail_at_once_into_the_dead_letter_stream_and_replay(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/gone", status=404, body="no such thing", times=1)
    api.route("/gone", json={"back": True})
    async with open_daemon(make_settings([source(api, "gone", "/gone", retries=FAST_RETRY)])):
        run_id = await trigger(request_reply, "gone")
        failed = await wait_for(lambda: finished(db_conn, run_id))
        assert failed["status"] == "failed"
        assert failed["attempts"] == 1
        assert failed["http_status"] == 404
        assert failed["error_code"] == "http_status"
        assert "HTTP 404" in failed["error"]
        assert "no such thing" in failed["error"]

        status = msgspec.json.decode((await request_reply("status")).data)
        assert status["sources"][0]["dead_letters"] == 1

        reply = msgspec.json.decode((await request_reply("dlq.replay", {"source": "gone"})).data)
        assert reply == {"replayed": 1, "run_ids": [run_id]}
        await wait_for(lambda: (run_row(db_conn, run_id) or {}).get("status") == "stored")
        status = msgspec.json.decode((await request_reply("status")).data)
        assert status["sources"][0]["dead_letters"] == 0
        again = msgspec.json.decode((await request_reply("dlq.replay", b"")).data)
        assert again == {"replayed": 0, "run_ids": []}
    row = run_row(db_conn, run_id)
    assert row is not None
    assert row["replay"] == 1
    assert row["error"] is None
    assert db_conn.execute("SELECT data FROM collected_data").fetchall() == [({"back": True},)]


async def test_a_slow_api_times_out_and_the_run_fails_with_the_reason(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/slow", json={"late": True}, delay_s=1.5)
    slow = source(
        api, "slow", "/slow", timeout_s=0.3, retries={"max_attempts": 2, "max_backoff_s": 0.1}
    )
    async with open_daemon(make_settings([slow])):
        run_id = await trigger(request_reply, "slow")
        row = await wait_for(lambda: finished(db_conn, run_id))
    assert row["status"] == "failed"
    assert row["error_code"] == "timeout"
    assert row["attempts"] == 2
    assert db_conn.execute("SELECT count(*) FROM collected_data").fetchone() == (0,)


async def test_a_retrying_source_does_not_delay_another(
    api: LocalAPI,
    other_api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
) -> None:
    """The retry waits outside the only fetch slot. The other source is on another host: a
    503's Retry-After holds its own host for every source (that wait is by design)."""
    # The quick run has the Retry-After (6 s) to be triggered, fetched and stored: room for a
    # loaded machine; a retry that waited in the slot would hold it that long.
    api.route("/busy", status=503, headers={"Retry-After": "6"}, times=1)
    api.route("/busy", json={"finally": True})
    other_api.route("/quick", json={"quick": True})
    settings = make_settings(
        [source(api, "busy", "/busy", retries=FAST_RETRY), source(other_api, "quick", "/quick")],
        max_concurrent_fetches=1,
    )
    async with open_daemon(settings):
        busy = await trigger(request_reply, "busy")
        await wait_for(lambda: api.hits("/busy"))
        quick = await trigger(request_reply, "quick")
        quick_row = await wait_for(lambda: finished(db_conn, quick))
        busy_now = run_row(db_conn, busy)
        busy_row = await wait_for(lambda: finished(db_conn, busy))
    assert quick_row["status"] == "stored"
    assert busy_now is not None
    assert busy_now["status"] != "stored", "the quick source finished while busy waited"
    assert busy_row["status"] == "stored"


async def test_too_large_a_response_fails_and_stores_nothing(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/huge", body=b"x" * 10_000, content_type="text/plain")
    async with open_daemon(make_settings([source(api, "huge", "/huge", max_response_bytes=1000)])):
        run_id = await trigger(request_reply, "huge")
        row = await wait_for(lambda: finished(db_conn, run_id))
    assert row["status"] == "failed"
    assert row["error_code"] == "response_too_large"
    assert "larger than 1000 bytes" in row["error"]
    assert db_conn.execute("SELECT count(*) FROM collected_data").fetchone() == (0,)


async def test_a_body_larger_than_a_nats_message_lands_whole(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    body = bytes(range(256)) * (3 * 4096)  # 3 MiB; the NATS max payload is 1 MiB
    api.route("/big", body=body, content_type="application/octet-stream")
    async with open_daemon(make_settings([source(api, "big", "/big")])) as daemon:
        run_id = await trigger(request_reply, "big")
        row = await wait_for(lambda: finished(db_conn, run_id), within_s=30)
        assert daemon.bus.bodies is not None
        # Removed once stored: the delete follows the commit, so wait for it (a get() racing
        # the delete can wait forever for chunks already purged; get_info() cannot).
        bodies = daemon.bus.bodies
        with anyio.fail_after(10):
            while await _still_stored(bodies, f"{run_id}/0"):  # noqa: ASYNC110 (polls NATS)
                await anyio.sleep(0.05)
    assert row["status"] == "stored"
    stored = db_conn.execute("SELECT body, content_type FROM collected_data").fetchone()
    assert stored == (body, "application/octet-stream")


async def _still_stored(bodies: Any, name: str) -> bool:
    try:
        await bodies.get_info(name)
    except nats.js.errors.NotFoundError:  # not found, or deleted
        return False
    return True


async def test_runs_of_one_source_do_not_overlap(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/single", json={"one": 1}, delay_s=0.5)
    async with open_daemon(make_settings([source(api, "single", "/single")])):
        first = await trigger(request_reply, "single")
        second = await trigger(request_reply, "single")
        await wait_for(lambda: finished(db_conn, first) and finished(db_conn, second))
    starts = [
        db_conn.execute(
            "SELECT started_at, finished_at FROM collection_runs WHERE run_id = %s", (r,)
        ).fetchone()
        for r in (first, second)
    ]
    (_a_start, a_end), (b_start, _b_end) = sorted(starts)
    assert b_start >= a_end, "the second run started before the first one finished"


async def test_poison_messages_go_to_the_dead_letter_stream_and_the_daemon_keeps_going(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    api.route("/fine", json={"fine": True})
    async with open_daemon(make_settings([source(api, "fine", "/fine")])):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish(f"{bus_prefix}.collect.fine", b'{"not": "a command"}')
            await js.publish(f"{bus_prefix}.raw.fine", b"\xff garbage")
            # A payload PostgreSQL rejects (a check constraint an operator added) next to a
            # good one.
            db_conn.execute(
                "ALTER TABLE collected_data ADD CONSTRAINT refuse"
                " CHECK (content_type IS DISTINCT FROM 'refuse/me')"
            )
            bad = RawPayload(
                run_id="fine@bad",
                source="fine",
                scheduled_for=datetime.now(UTC),
                fetched_at=datetime.now(UTC),
                url="http://x",
                status_code=200,
                content_type="refuse/me",
                body=b"bad",
            )
            await js.publish(f"{bus_prefix}.raw.fine", encode(bad))
            run_id = await trigger(request_reply, "fine")
            await wait_for(lambda: (run_row(db_conn, run_id) or {}).get("status") == "stored")
            await wait_for(lambda: (run_row(db_conn, "fine@bad") or {}).get("status") == "failed")
            dlq = await js.stream_info(f"{bus_prefix.upper()}_DLQ")
        finally:
            await nc.close()
        status = msgspec.json.decode((await request_reply("status")).data)
    assert dlq.state.messages == 3
    assert status["sources"][0]["dead_letters"] == 3
    rejected = run_row(db_conn, "fine@bad")
    assert rejected is not None
    assert rejected["error_code"] == "store_rejected"
    assert db_conn.execute("SELECT run_id FROM collected_data").fetchall() == [(run_id,)]


async def test_the_total_timeout_bounds_a_whole_attempt(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    api.route("/dribble", json={"late": True}, delay_s=1.0)
    dribble = source(
        api,
        "dribble",
        "/dribble",
        timeout_s=5,
        total_timeout_s=0.4,
        retries={"max_attempts": 1, "max_backoff_s": 0.1},
    )
    async with open_daemon(make_settings([dribble])):
        run_id = await trigger(request_reply, "dribble")
        row = await wait_for(lambda: finished(db_conn, run_id))
    assert row["status"] == "failed"
    assert row["error_code"] == "timeout"
    assert "longer than total_timeout_s (0.4 s)" in row["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_compressed_responses_are_stored_decoded(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    encoding: str,
) -> None:
    plain = b'{"compressed": "' + b"z" * 5000 + b'"}'
    packers: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": lambda b: bytes(brotli.compress(b)),
    }
    packed = packers[encoding](plain)
    api.route(
        "/packed",
        body=packed,
        content_type="application/json",
        headers={"Content-Encoding": encoding},
    )
    async with open_daemon(make_settings([source(api, "packed", "/packed")])):
        run_id = await trigger(request_reply, "packed")
        row = await wait_for(lambda: finished(db_conn, run_id))
    assert row["status"] == "stored"
    (hit,) = api.hits("/packed")
    assert "br" in hit.headers["accept-encoding"]
    stored = db_conn.execute("SELECT data FROM collected_data").fetchone()
    assert stored == ({"compressed": "z" * 5000},)
