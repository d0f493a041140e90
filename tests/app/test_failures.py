"""Failures are classified once and end somewhere a user can see them: never a crash, never an
endless redelivery, never a silent drop (issue "hostile input", part 1).

Each test is a hostile answer or a broken bus seen from the outside: a run's record in
PostgreSQL, the dead-letter stream, the consumer's state, the log.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import nats
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy

from contracts import CollectCommand, DeadLetter, Subjects, encode
from daemon.app import open_daemon
from daemon.platform.dead_letters import original_of
from tests._collect import FAST_RETRY, finished, run_row, source, trigger
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_faults import eventually
from tests.fix_http import LocalAPI

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


async def dead_letters(nats_url: str, prefix: str) -> list[DeadLetter]:
    """Every dead letter of the test's namespace, oldest first."""
    s = Subjects(prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(s.dlq_stream)
        except nats.js.errors.NotFoundError:
            return []
        letters = []
        for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
            try:
                raw = await js.get_msg(s.dlq_stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            letters.append(msgspec.json.decode(raw.data or b"", type=DeadLetter))
        return letters
    finally:
        await nc.close()


async def consumer_deliveries(nats_url: str, prefix: str) -> dict[str, int]:
    """``max_deliver`` of each of the pipeline's durable consumers."""
    s = Subjects(prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        out = {}
        for stream, consumer in (
            (s.collect_stream, s.fetcher_consumer),
            (s.collect_stream, s.runs_consumer),
            (s.raw_stream, s.writer_consumer),
        ):
            info = await js.consumer_info(stream, consumer)
            out[consumer] = int(info.config.max_deliver or -1)
        return out
    finally:
        await nc.close()


async def test_every_consumer_gives_up_after_finitely_many_deliveries(
    make_settings: MakeSettings, nats_url: str, bus_prefix: str
) -> None:
    settings = make_settings(
        [
            {
                "name": "a",
                "url": "http://127.0.0.1:9/",
                "schedule": "0 0 1 1 *",
                "retries": {"max_attempts": 30},
            }
        ]
    )
    async with open_daemon(settings):
        deliveries = await consumer_deliveries(nats_url, bus_prefix)
    # -1 (unlimited) redelivers a message nobody can settle forever. The fetcher's allows the
    # largest retry budget (30 attempts) and 10 hand-backs.
    assert deliveries == {"fetcher": 40, "runs": 20, "writer": 20}


async def test_a_body_that_does_not_match_its_content_encoding_fails_the_run_once(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """Once handed back every 5 s forever (an unmapped httpx.DecodingError)."""
    api.route("/gz", body=b"plain bytes, not gzip", headers={"Content-Encoding": "gzip"})
    settings = make_settings([source(api, "gz", "/gz", retries=FAST_RETRY)])
    async with open_daemon(settings):
        run_id = await trigger(request_reply, "gz")
        row = await wait_for(lambda: finished(db_conn, run_id), what="the run to end")
        letters = await eventually(
            lambda: dead_letters(nats_url, bus_prefix), what="its dead letter"
        )
    assert row["status"] == "failed"
    assert row["error_code"] == "bad_encoding"
    assert "Content-Encoding" in row["error"]
    assert len(api.hits("/gz")) == 1, "a permanent failure is not retried"
    assert [(letter.run_id, letter.error_code) for letter in letters] == [(run_id, "bad_encoding")]
    command = msgspec.json.decode(letters[0].original, type=CollectCommand)
    assert command.run_id == run_id


async def test_a_lease_bucket_that_does_not_answer_is_retried_not_crashed(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its NoStreamResponseError escaped as ``fetch.crashed`` with an exception group."""
    api.route("/leased", json={"ok": True})
    settings = make_settings([source(api, "leased", "/leased")])
    async with open_daemon(settings):
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(f"KV_{Subjects(bus_prefix).leases_bucket}")
        finally:
            await nc.close()
        run_id = await trigger(request_reply, "leased")
        row = await wait_for(lambda: finished(db_conn, run_id), within_s=30, what="the run")
    assert row["status"] == "stored"
    crashed = [r for r in caplog.records if r.getMessage() == "fetch.crashed"]
    assert crashed == []
    assert any(r.getMessage() == "fetch.bus_unavailable" for r in caplog.records)


async def test_an_undecodable_message_too_large_to_wrap_is_dead_lettered_through_the_object_store(
    make_settings: MakeSettings,
    request_reply: Requester,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """A dead letter wraps its original in base64: over ~750 KB it exceeded the NATS limit,
    the error escaped and the daemon exited, again after every restart."""
    garbage = b"\xff" + bytes(range(256)) * 3500  # ~900 KB, not JSON
    s = Subjects(bus_prefix)
    async with open_daemon(make_settings([])) as daemon:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish(s.raw("big"), garbage)
            await js.publish(s.collect("big"), garbage)
            letters = await eventually(
                lambda: dead_letters(nats_url, bus_prefix),
                until=lambda found: len(found) == 2,
                what="both dead letters",
            )
            for letter in letters:
                assert letter.original == b""
                assert letter.original_size == len(garbage)
                assert letter.original_ref is not None
                assert await original_of(daemon.bus, letter) == garbage
            # The daemon is still serving.
            reply = await request_reply("health")
            assert msgspec.json.decode(reply.data)["status"] in ("ok", "degraded")
            # Replayed, the original goes back byte for byte (and is dead-lettered again).
            sub = await nc.subscribe(s.raw("big"))
            replay = await request_reply("dlq.replay", {})
            assert msgspec.json.decode(replay.data)["replayed"] == 2
            again = await sub.next_msg(timeout=5)
            assert again.data == garbage
        finally:
            await nc.close()


async def test_a_poison_command_stays_on_its_stream_while_the_dead_letter_stream_refuses(
    make_settings: MakeSettings, nats_url: str, bus_prefix: str
) -> None:
    """It was dropped (``dead_letter_failed``) and lost."""
    s = Subjects(bus_prefix)
    async with open_daemon(make_settings([]), roles=["fetcher"]):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            # The dead-letter stream refuses every new message.
            config = (await js.stream_info(s.dlq_stream)).config
            config.max_msgs = 0
            config.discard = DiscardPolicy.NEW
            await js.update_stream(config)
            config.max_msgs = 1
            await js.update_stream(config)
            await js.publish(s.dlq("x", "filler"), encode(_letter()))
            await js.publish(s.collect("p"), b'{"not": "a command"}')

            async def unsettled() -> int:
                info = await js.consumer_info(s.collect_stream, s.fetcher_consumer)
                return int(info.num_ack_pending)

            await eventually(unsettled, what="the poison command delivered and held")
            await anyio.sleep(5)
            assert await unsettled() == 1, "the poison command was dropped"
            info = await js.consumer_info(s.collect_stream, s.fetcher_consumer)
            assert info.num_redelivered == 0, "held, not handed back over and over"
            # The dead-letter stream takes messages again: the letter is stored, the command
            # settled.
            config.max_msgs = -1
            await js.update_stream(config)
            await eventually(unsettled, until=lambda n: n == 0, within_s=40, what="settled")
            letters = await dead_letters(nats_url, bus_prefix)
            assert [letter.error_code for letter in letters] == ["filler", "poison"]
            assert letters[1].original == b'{"not": "a command"}'
        finally:
            await nc.close()


async def test_a_payload_nobody_can_settle_becomes_a_dead_letter_after_max_deliveries(
    make_settings: MakeSettings, nats_url: str, bus_prefix: str
) -> None:
    """A writer that dies (or hangs) holding a message each time: after ``max_deliveries`` it
    is a dead letter, not an endless redelivery, and not a silent drop."""
    s = Subjects(bus_prefix)
    settings = make_settings([], max_deliveries=3, ack_wait_s=1)
    async with open_daemon(settings, roles=["fetcher"]):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish(s.raw("stuck"), b'{"kind": "page", "hung": true}')
            # A writer that takes the message and never settles it. (JetStream notices the
            # exhausted message when it would deliver it again: on a pull.)
            hung = await js.pull_subscribe_bind(durable=s.writer_consumer, stream=s.raw_stream)
            deliveries = 0

            async def letters_after_a_pull() -> list[DeadLetter]:
                nonlocal deliveries
                deliveries += await _fetch_one(hung)
                return await dead_letters(nats_url, bus_prefix)

            letters = await eventually(letters_after_a_pull, within_s=30, what="the dead letter")
        finally:
            await nc.close()
    assert [(letter.error_code, letter.deliveries) for letter in letters] == [("max_deliveries", 3)]
    assert letters[0].original == b'{"kind": "page", "hung": true}'
    assert letters[0].stream == s.raw_stream


async def test_a_command_that_exhausts_its_deliveries_fails_its_run(
    make_settings: MakeSettings, nats_url: str, bus_prefix: str, db_conn: Any
) -> None:
    s = Subjects(bus_prefix)
    settings = make_settings(
        [
            {
                "name": "h",
                "url": "http://127.0.0.1:9/",
                "schedule": "0 0 1 1 *",
                "retries": {"max_attempts": 1},
            }
        ],
        max_deliveries=2,
        ack_wait_s=1,
    )
    command = CollectCommand(
        run_id="h@manual-x",
        source="h",
        scheduled_for=_now(),
        trigger="manual",
        requested_at=_now(),
    )
    async with open_daemon(settings, roles=["writer", "service"]):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish(s.collect("h"), encode(command), headers={"Nats-Msg-Id": "h1"})
            hung = await js.pull_subscribe_bind(durable=s.fetcher_consumer, stream=s.collect_stream)
            deliveries = 0

            async def outcome_after_a_pull() -> dict[str, Any] | None:
                nonlocal deliveries
                deliveries += await _fetch_one(hung)
                return finished(db_conn, "h@manual-x")

            row = await eventually(outcome_after_a_pull, within_s=60, what="the run failed")
        finally:
            await nc.close()
    assert deliveries == 11  # max(max_deliveries, max_attempts + 10)
    assert row is not None
    assert row["status"] == "failed"
    assert row["error_code"] == "max_deliveries"


async def test_a_slow_source_with_many_pending_commands_does_not_starve_the_others(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """300 commands of a source whose API answers after minutes used to fill the fetcher's
    window of 256 unacknowledged commands: no other source was collected."""
    api.route("/slow", json={"slow": True}, delay_s=100)
    api.route("/fast", json={"fast": True})
    settings = make_settings(
        [source(api, "slow", "/slow", timeout_s=200), source(api, "fast", "/fast")],
        shutdown_grace_s=1,
    )
    s = Subjects(bus_prefix)
    async with open_daemon(settings):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for i in range(300):
                command = CollectCommand(
                    run_id=f"slow@{i}",
                    source="slow",
                    scheduled_for=_now(),
                    trigger="manual",
                    requested_at=_now(),
                )
                await js.publish(s.collect("slow"), encode(command))
            await wait_for(lambda: len(api.hits("/slow")) == 1, what="the slow run in flight")
            with anyio.fail_after(15):
                run_id = await trigger(request_reply, "fast")
                row = await wait_for(lambda: finished(db_conn, run_id), what="the fast run")
            # The slow source's other commands wait outside the fetcher's window.
            deferred = await js.stream_info(s.defer_stream)
        finally:
            await nc.close()
    assert deferred.state.messages == 299
    assert row["status"] == "stored"
    assert run_row(db_conn, "slow@5") is not None  # recorded as queued meanwhile


async def _fetch_one(sub: Any) -> int:
    try:
        msgs = await sub.fetch(1, timeout=2)
    except (nats.errors.TimeoutError, TimeoutError):
        return 0
    return len(msgs)


def _letter() -> DeadLetter:
    return DeadLetter(
        source="x", subject="x", original=b"", error_code="filler", error="", dead_at=_now()
    )


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def test_waiting_for_another_replica_does_not_use_up_a_runs_retries(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """Hand-backs while another replica held the source's lease were counted as attempts by
    whichever replica received them, so a run could fail without ever being tried."""
    api.route("/busy", json={"first": True}, delay_s=4, times=1)  # the first run: slow
    api.route("/busy", status=503, body="busy", content_type="text/plain", times=2)
    api.route("/busy", json={"second": True})  # the second run's third attempt succeeds
    settings = make_settings(
        [source(api, "busy", "/busy", retries={"max_attempts": 3, "max_backoff_s": 0.1})],
        max_concurrent_fetches=1,
    )
    async with open_daemon(settings), open_daemon(settings):
        first = await trigger(request_reply, "busy")
        await wait_for(lambda: len(api.hits("/busy")) == 1, what="the first run in flight")
        second = await trigger(request_reply, "busy")
        row = await wait_for(lambda: finished(db_conn, second), within_s=30, what="the 2nd run")
        assert finished(db_conn, first) is not None
    assert row["status"] == "stored"
    assert row["attempts"] == 3
    assert len(api.hits("/busy")) == 4


def _refuse_inserts(db_conn: Any, sqlstate: str) -> None:
    """Make PostgreSQL refuse every row of ``collected_data`` with ``sqlstate``."""
    db_conn.execute(
        "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN RAISE EXCEPTION 'refused for the test' USING ERRCODE = '{sqlstate}'; END $$"
    )
    db_conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON collected_data"
        " FOR EACH ROW EXECUTE FUNCTION refuse()"
    )


async def test_a_database_that_cannot_take_writes_for_now_holds_the_data(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """Read-only after a failover (25006): not the data's fault. Dead-lettering every page
    would only move the problem; the batch is held until the database takes writes."""
    api.route("/ro", json={"ro": True})
    async with open_daemon(make_settings([source(api, "ro", "/ro")])):
        _refuse_inserts(db_conn, "25006")
        run_id = await trigger(request_reply, "ro")
        await anyio.sleep(4)
        assert (run_row(db_conn, run_id) or {}).get("status") != "stored"
        db_conn.execute("DROP TRIGGER refuse ON collected_data")
        row = await wait_for(lambda: finished(db_conn, run_id), what="the run stored")
    assert row["status"] == "stored"
    assert await dead_letters(nats_url, bus_prefix) == []


async def test_a_statement_postgresql_keeps_cancelling_is_not_retried_forever(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """A statement timeout every time (57014): retried a few times, then a refusal."""
    api.route("/slowdb", json={"slow": True})
    async with open_daemon(make_settings([source(api, "slowdb", "/slowdb")])):
        _refuse_inserts(db_conn, "57014")
        run_id = await trigger(request_reply, "slowdb")
        row = await wait_for(lambda: finished(db_conn, run_id), within_s=60, what="the run")
        letters = await eventually(lambda: dead_letters(nats_url, bus_prefix), what="letter")
    assert (row["status"], row["error_code"]) == ("failed", "store_rejected")
    assert "57014" in row["error"]
    assert [letter.error_code for letter in letters] == ["store_rejected"]


async def test_an_error_body_with_a_nul_byte_is_recorded_as_the_apis_error(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
) -> None:
    """Found by the property test: the run's error quoted the body, and PostgreSQL refused
    the NUL in ``collection_runs.error``: the run ended ``store_rejected``, not ``http_status``."""
    api.route("/nul", status=400, body=b"bad\x00request\xed\xa0\x80", content_type="text/plain")
    async with open_daemon(make_settings([source(api, "nul", "/nul")])):
        run_id = await trigger(request_reply, "nul")
        row = await wait_for(lambda: finished(db_conn, run_id), what="the run")
    assert (row["status"], row["error_code"]) == ("failed", "http_status")
    assert "bad\\x00request" in row["error"]
