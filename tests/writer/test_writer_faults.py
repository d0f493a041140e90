"""What the writer does with messages it cannot store, on a real daemon, NATS and PostgreSQL.

The messages come from "a hostile program on the bus": published straight to
``<prefix>.raw.<source>`` before the daemon starts, so the writer takes them in one batch. Each
failure is classified once: a message PostgreSQL refuses or that is not a valid contract goes
to the dead-letter stream (and its run is recorded failed where it can be), the rest of its
batch is stored, and the writer goes on writing.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import nats.js.errors
import psycopg
import pytest
from nats.js.api import DiscardPolicy

from contracts import DeadLetter, RawPayload, Subjects, decoder, encode
from daemon.app import open_daemon
from daemon.platform.bus import Bus, BusOptions
from daemon.platform.migrate import apply_migrations
from daemon.settings import Settings
from tests._collect import data_rows, run, run_row, source
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_faults import eventually
from tests.fix_http import LocalAPI

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

_decode_letter = decoder(DeadLetter).decode


@contextlib.asynccontextmanager
async def declared(settings: Settings) -> AsyncIterator[Bus]:
    """The test's streams, declared as the daemon declares them, before it starts."""
    options = BusOptions(
        max_age_s=settings.stream_max_age_s,
        duplicate_window_s=settings.duplicate_window_s,
        ack_wait_s=settings.ack_wait_s,
    )
    async with Bus.open(settings.nats_url or "", Subjects(settings.bus_prefix), options) as bus:
        yield bus


def page(run_id: str, *, page: int = 0, last: bool = True, **fields: Any) -> RawPayload:
    """A page of source ``s`` as the fetcher would publish it."""
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "source": "s",
        "scheduled_for": now,
        "fetched_at": now,
        "url": "http://127.0.0.1/s",
        "status_code": 200,
        "content_type": "application/json",
        "body": b'{"ok": true}',
    }
    values.update(fields)
    return RawPayload(run_id=run_id, page=page, last=last, **values)


async def dead_letters(bus: Bus) -> list[tuple[str, DeadLetter]]:
    """``(subject, letter)`` of every message in the dead-letter stream, oldest first."""
    stream = bus.subjects.dlq_stream
    info = await bus.js.stream_info(stream)
    found = []
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        try:
            raw = await bus.js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        if raw.subject and raw.subject.startswith(f"{bus.subjects.prefix}.dlq.s."):
            found.append((raw.subject, _decode_letter(raw.data or b"")))
    return found


async def unsettled(bus: Bus) -> int:
    """Messages of the raw stream the writer has not acked (or termed) yet."""
    info = await bus.js.consumer_info(bus.subjects.raw_stream, bus.subjects.writer_consumer)
    return int(info.num_pending + info.num_ack_pending)


def stored_data(db: psycopg.Connection[Any], run_id: str) -> list[Any]:
    return [row[2] for row in data_rows(db, run_id)]


async def test_a_row_postgres_refuses_for_its_size_is_dead_lettered_and_the_rest_stored(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    """A run id of ~13 KB makes the unique index refuse the row: 54000, "index row requires
    13400 bytes, maximum size is 8191" (an ``OperationalError``, yet no lost connection): it
    is not retried."""
    api.route("/s", json={"after": True})
    settings = make_settings([source(api, "s", "/s")])
    huge_run_id = "s@" + base64.b64encode(os.urandom(10_000)).decode()  # incompressible
    bad = encode(page(huge_run_id))
    async with declared(settings) as bus:
        raw = bus.subjects.raw("s")
        await bus.js.publish(raw, encode(page("s@first")))
        await bus.js.publish(raw, bad)
        await bus.js.publish(raw, encode(page("s@second")))
        async with open_daemon(settings):
            await wait_for(
                lambda: stored_data(db_conn, "s@first") and stored_data(db_conn, "s@second"),
                what="the other messages of the batch stored",
            )
            letters = await eventually(lambda: dead_letters(bus), what="the dead letter")
            after = await run(request_reply, db_conn, "s")  # the writer keeps writing
        assert await unsettled(bus) == 0
    assert [(subject, letter.original) for subject, letter in letters] == [
        (f"{bus.subjects.prefix}.dlq.s.store_rejected", bad)
    ]
    assert "index row" in letters[0][1].error
    assert "(SQLSTATE 54000)" in letters[0][1].error
    assert after["status"] == "stored"
    assert stored_data(db_conn, after["run_id"]) == [{"after": True}]
    assert stored_data(db_conn, "s@first") == [{"ok": True}]


async def test_poison_messages_are_dead_lettered_and_the_batch_written(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    api.route("/s", json={"after": True})
    settings = make_settings([source(api, "s", "/s")])
    # A field nested 100,000 deep: msgspec raises RecursionError, not DecodeError.
    deep = b'{"kind": "page", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    poison = [b"\xff undecodable", b'{"kind": "page", "run_id": 7}', deep]
    async with declared(settings) as bus:
        raw = bus.subjects.raw("s")
        await bus.js.publish(raw, encode(page("s@first")))
        for data in poison:
            await bus.js.publish(raw, data)
        await bus.js.publish(raw, encode(page("s@second")))
        async with open_daemon(settings):
            await wait_for(
                lambda: stored_data(db_conn, "s@first") and stored_data(db_conn, "s@second"),
                what="the good messages of the batch stored",
            )
            letters = await eventually(
                lambda: dead_letters(bus), until=lambda found: len(found) >= 3, what="3 letters"
            )
            after = await run(request_reply, db_conn, "s")
        assert await unsettled(bus) == 0
    assert sorted(letter.original for _, letter in letters) == sorted(poison)
    assert {subject.rsplit(".", 1)[1] for subject, _ in letters} == {"poison"}
    assert after["status"] == "stored"


async def test_a_message_whose_dead_letter_is_refused_stays_until_it_is_stored(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    """The dead-letter stream is full (max_msgs = 1, discard new): the poison message is not
    termed, and so not lost; once the stream takes it, the letter is stored and it goes."""
    settings = make_settings([source(api, "s", "/s")])
    async with declared(settings) as bus, open_daemon(settings):
        # Once the daemon has declared its streams (which would undo this).
        s = bus.subjects
        info = await bus.js.stream_info(s.dlq_stream)
        full = dataclasses.replace(info.config, max_msgs=1, discard=DiscardPolicy.NEW)
        await bus.js.update_stream(full)
        await bus.js.publish(s.dlq("filler", "x"), b"the one message the stream holds")
        await bus.js.publish(s.raw("s"), b"\xff poison")
        await bus.js.publish(s.raw("s"), encode(page("s@good")))
        await wait_for(lambda: stored_data(db_conn, "s@good"), what="the good page stored")

        async def redelivered() -> int:
            consumer = await bus.js.consumer_info(s.raw_stream, s.writer_consumer)
            return int(consumer.num_redelivered)

        # Held on its stream (not termed, and not handed back over and over: each hand-back
        # would spend a delivery) while its dead letter is refused.
        await eventually(lambda: unsettled(bus), until=lambda n: n == 1, what="the message held")
        await anyio.sleep(3)
        assert await unsettled(bus) == 1
        assert await redelivered() == 0
        assert await dead_letters(bus) == []

        await bus.js.update_stream(
            dataclasses.replace(full, max_msgs=-1, discard=DiscardPolicy.OLD)
        )
        letters = await eventually(lambda: dead_letters(bus), what="the dead letter")
        await eventually(lambda: unsettled(bus), until=lambda n: n == 0, what="termed")
    assert [letter.original for _, letter in letters] == [b"\xff poison"]


async def refuse_content_type(settings: Settings, db_conn: psycopg.Connection[Any]) -> None:
    """Migrate the test's schema now and make PostgreSQL refuse rows whose content type is
    ``refuse/me`` (23514, a check constraint an operator might add)."""
    assert settings.database_url is not None
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        await apply_migrations(conn, settings.database_schema)
    db_conn.execute(
        "ALTER TABLE collected_data ADD CONSTRAINT refuse"
        " CHECK (content_type IS DISTINCT FROM 'refuse/me')"
    )


async def test_a_rejected_page_keeps_its_body_and_a_stored_one_loses_it(
    make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    """One message of the batch is rejected (a check constraint): the batch is written one
    message at a time. The stored page's body leaves the object store like any stored body;
    the rejected page's stays for a replay of its dead letter."""
    settings = make_settings()
    await refuse_content_type(settings, db_conn)
    big = b'{"big": "' + b"x" * 2_000_000 + b'"}'
    async with declared(settings) as bus:
        await bus.put_body("s@good/0", big)
        await bus.put_body("s@bad/0", b'{"bad": true}')
        good = page("s@good", body=b"", body_ref="s@good/0", body_size=len(big))
        bad = page("s@bad", body=b"", body_ref="s@bad/0", body_size=13, content_type="refuse/me")
        await bus.js.publish(bus.subjects.raw("s"), encode(bad))
        await bus.js.publish(bus.subjects.raw("s"), encode(good))
        assert bus.bodies is not None
        bodies = bus.bodies

        async def gone(name: str) -> bool:
            try:
                await bodies.get_info(name)
            except nats.js.errors.NotFoundError:
                return True
            return False

        async with open_daemon(settings):
            await wait_for(lambda: stored_data(db_conn, "s@good"), what="the good page stored")
            await eventually(lambda: dead_letters(bus), what="the dead letter")
            await eventually(lambda: gone("s@good/0"), what="the stored page's body removed")
        assert not await gone("s@bad/0")
    assert stored_data(db_conn, "s@good") == [msgspec.json.decode(big)]
    assert (run_row(db_conn, "s@bad") or {}).get("error_code") == "store_rejected"


async def test_a_run_with_a_rejected_page_does_not_move_its_source_state(
    make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    """Page 0 is rejected, the last page (with the cursor) is stored: the cursor must not get
    ahead of the rows, or the next run would never ask for page 0's records again."""
    settings = make_settings()
    await refuse_content_type(settings, db_conn)
    async with declared(settings) as bus:
        raw = bus.subjects.raw("s")
        await bus.js.publish(raw, encode(page("s@1", page=0, last=False, content_type="refuse/me")))
        await bus.js.publish(raw, encode(page("s@1", page=1, cursor="99")))
        async with open_daemon(settings):
            await wait_for(lambda: stored_data(db_conn, "s@1"), what="the last page stored")
            await eventually(lambda: dead_letters(bus), what="the dead letter")
            await eventually(lambda: unsettled(bus), until=lambda n: n == 0, what="settled")
    assert (run_row(db_conn, "s@1") or {}).get("status") == "failed"
    assert db_conn.execute("SELECT cursor FROM source_state").fetchall() == []


async def test_a_page_whose_rows_cannot_be_built_fails_its_run_alone(
    make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    """A valid payload whose body is JSON nested 100,000 deep, to be split into records: its
    rows cannot be built (RecursionError, unclassified by the writer's own code). Either it is
    stored whole, or its run fails and it is dead-lettered — never does it stop the writer or
    its batch."""
    settings = make_settings()
    deep = b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with declared(settings) as bus:
        raw = bus.subjects.raw("s")
        await bus.js.publish(raw, encode(page("s@first")))
        await bus.js.publish(
            raw, encode(page("s@deep", body=deep, granularity="record", records_path="items"))
        )
        await bus.js.publish(raw, encode(page("s@second")))
        async with open_daemon(settings):
            await wait_for(
                lambda: stored_data(db_conn, "s@first") and stored_data(db_conn, "s@second"),
                what="the other messages of the batch stored",
            )
            await eventually(lambda: unsettled(bus), until=lambda n: n == 0, what="settled")
            letters = await dead_letters(bus)
    deep_run = run_row(db_conn, "s@deep") or {}
    if letters:
        assert [letter.run_id for _, letter in letters] == ["s@deep"]
        assert (deep_run.get("status"), deep_run.get("error_code")) == ("failed", "too_deep")
    else:
        assert deep_run.get("status") == "stored"
        assert data_rows(db_conn, "s@deep")
