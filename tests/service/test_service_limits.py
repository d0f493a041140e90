"""The service under load and abuse: every reply fits in a NATS message, every request is survived.

2,000 sources whose last runs failed with long errors need several pages of ``coleta.status``;
``coleta.runs`` at its largest limit too. Oversized, deeply nested, wrong-typed and non-UTF-8
requests on every endpoint get a short 4xx reply, never a traceback, and the service keeps
answering ``coleta.health``. Health checks every stream and bucket the pipeline needs.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import nats
import nats.js.errors
import psycopg
import pytest
from nats.aio.msg import Msg

from contracts import RunsReply, StatusReply, Subjects
from daemon.app import open_daemon
from tests._collect import ERROR_CHARS, SOURCES, insert_failed_runs, many_sources
from tests.fix_daemon import MakeSettings, Requester

pytestmark = pytest.mark.anyio

#: What a reply may echo of a request, at most (a message, not the request).
SHORT_REPLY = 600


async def max_payload(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        return int(nc.max_payload)
    finally:
        await nc.close()


def wire_size(msg: Msg) -> int:
    """What NATS counts against max_payload: the payload and the header block."""
    headers = msg.headers or {}
    return len(msg.data) + 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


def error_of(msg: Msg) -> tuple[str, str] | None:
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" not in headers:
        return None
    return headers["Nats-Service-Error-Code"], headers["Nats-Service-Error"]


async def test_status_pages_fit_in_a_message_and_cover_every_source(
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
) -> None:
    limit = await max_payload(nats_url)
    async with open_daemon(make_settings(many_sources()), roles=("service",)):
        insert_failed_runs(db_conn)
        pages: list[Msg] = []
        body: dict[str, Any] = {}
        while True:
            msg = await request_reply("status", body, wait_s=20)
            assert error_of(msg) is None, error_of(msg)
            pages.append(msg)
            reply = msgspec.json.decode(msg.data, type=StatusReply)
            if reply.next is None:
                break
            assert len(pages) < 100, "status pages never end"
            body = {"after": reply.next}

    replies = [msgspec.json.decode(msg.data, type=StatusReply) for msg in pages]
    assert len(pages) > 1
    assert max(wire_size(msg) for msg in pages) < limit
    names = [src.name for reply in replies for src in reply.sources]
    assert names == [f"src{i:04d}" for i in range(SOURCES)]
    for reply in replies[:-1]:
        assert reply.next == reply.sources[-1].name
    last = replies[0].sources[0].last_run
    assert last is not None
    assert last.status == "failed"
    assert last.error is not None
    assert last.error.startswith("HTTP 500: eee")
    assert len(last.error) < 1100
    assert last.error.endswith(f"[truncated: {ERROR_CHARS + 10:,} characters in all]")


async def test_status_of_one_source_and_a_stale_cursor(
    make_settings: MakeSettings, request_reply: Requester
) -> None:
    async with open_daemon(make_settings(many_sources(3)), roles=("service",)):
        one = await request_reply("status", {"source": "src0001"})
        unknown = await request_reply("status", {"source": "nope"})
        stale = await request_reply("status", {"after": "gone"})
    reply = msgspec.json.decode(one.data, type=StatusReply)
    assert [src.name for src in reply.sources] == ["src0001"]
    assert reply.next is None
    assert error_of(unknown) == (
        "404",
        "unknown source 'nope' (configured: src0000, src0001, src0002)",
    )
    code, message = error_of(stale) or ("", "")
    assert code == "400"
    assert message.startswith("after: no source 'gone'")


async def test_runs_at_the_largest_limit_fit_in_a_message(
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
) -> None:
    limit = await max_payload(nats_url)
    async with open_daemon(make_settings(many_sources()), roles=("service",)):
        insert_failed_runs(db_conn)
        pages: list[Msg] = []
        body: dict[str, Any] = {"limit": 1000}
        got = 0
        while got < 1000:
            msg = await request_reply("runs", body, wait_s=20)
            assert error_of(msg) is None, error_of(msg)
            pages.append(msg)
            reply = msgspec.json.decode(msg.data, type=RunsReply)
            got += len(reply.runs)
            assert reply.next is not None  # 2,000 runs: more remain after the first 1,000
            body = {"limit": 1000 - got, "after": reply.next}
        only = await request_reply("runs", {"source": "src0007", "limit": 1000})

    replies = [msgspec.json.decode(msg.data, type=RunsReply) for msg in pages]
    assert len(pages) > 1
    assert max(wire_size(msg) for msg in pages) < limit
    run_ids = [run.run_id for reply in replies for run in reply.runs]
    assert run_ids == [f"src{i:04d}@20261201T000000Z-manual-{i}" for i in range(1000)]
    assert all(run.error is not None and len(run.error) < 1100 for r in replies for run in r.runs)
    one = msgspec.json.decode(only.data, type=RunsReply)
    assert [run.source for run in one.runs] == ["src0007"]
    assert one.next is None


# -- hostile requests --------------------------------------------------------------------------

#: Each endpoint's main request field, where a hostile value goes.
FIELDS = {
    "status": "after",
    "trigger": "source",
    "runs": "source",
    "health": "source",
    "dlq.replay": "source",
    "backfill": "source",
    "backfill.progress": "run_ids",
}


def hostile(endpoint: str) -> dict[str, bytes]:
    field = FIELDS[endpoint]

    def body(value: Any) -> bytes:
        wrapped = [value] if field == "run_ids" else value
        extra = {"start": "2026-01-01", "end": "2026-01-02"} if endpoint == "backfill" else {}
        return msgspec.json.encode({field: wrapped, **extra})

    def raw(json_value: bytes) -> bytes:
        """A value written as JSON text (msgspec would not encode these)."""
        wrapped = b"[%s]" % json_value if field == "run_ids" else json_value
        return b'{"%s": %s}' % (field.encode(), wrapped)

    def nested(depth: int) -> bytes:
        good = b'["x"]' if field == "run_ids" else b'"src0000"'
        return b'{"%s": %s, "ignored": %s%s}' % (
            field.encode(),
            good,
            b"[" * depth,
            b"]" * depth,
        )

    return {
        "oversized": body("x" * 1_000_000),
        "long_value": body("y" * 60_000),
        "nested": nested(20_000),
        "nested_oversized": nested(100_000),
        "numbers_for_strings": msgspec.json.encode(
            {
                field: 12345,
                "limit": "ten",
                "after": 7,
                "start": 1,
                "end": [2],
                "force": "yes",
                "scheduled_for": 5,
                "run_id": {"a": 1},
            }
        ),
        "list_for_object": b'[{"source": "src0000"}, 1, null]',
        "non_utf8_string": raw(b'"\xff\xfe\xfd"'),
        "non_utf8_bytes": bytes(range(128, 256)) * 8,
        "null_bytes": raw(b'"a\\u0000b"'),
        "lone_surrogate": raw(b'"a\\ud800b"'),
    }


@pytest.mark.parametrize("endpoint", list(FIELDS))
async def test_hostile_requests_get_short_4xx_replies_and_the_service_keeps_serving(
    make_settings: MakeSettings,
    request_reply: Requester,
    caplog: pytest.LogCaptureFixture,
    nats_url: str,
    endpoint: str,
) -> None:
    limit = await max_payload(nats_url)
    outcomes: dict[str, tuple[str, str] | None] = {}
    async with open_daemon(make_settings(many_sources(2)), roles=("service",)):
        for kind, data in hostile(endpoint).items():
            msg = await request_reply(endpoint, data)
            outcomes[kind] = error_of(msg)
            assert wire_size(msg) < limit, kind
            if outcomes[kind] is not None:
                assert len(msg.data) < SHORT_REPLY, (kind, msg.data[:200])
            health = await request_reply("health")
            assert error_of(health) is None, (kind, error_of(health))
            assert msgspec.json.decode(health.data)["status"] == "ok", kind

    for kind, outcome in outcomes.items():
        if outcome is None:
            continue
        code, message = outcome
        assert code in ("400", "404", "413"), (kind, code, message)
        assert len(message) <= 300, (kind, message)
        assert "Traceback" not in message, kind
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]

    too_large = {"oversized", "nested_oversized"}
    if endpoint == "health":  # health ignores what it is sent, within the size limit
        assert {k for k, o in outcomes.items() if o is not None} == too_large
        assert {o[0] for k, o in outcomes.items() if o is not None} == {"413"}
        return
    if endpoint == "backfill.progress":  # a request names any run ids, a whole message of them
        assert outcomes["long_value"] is None
        assert outcomes["oversized"] is None
        for kind in ("null_bytes", "lone_surrogate", "non_utf8_string"):
            outcome = outcomes[kind]
            assert outcome is not None, kind
            assert outcome[0] == "400", (kind, outcome)
    else:
        assert outcomes["oversized"] == (
            "413",
            f"request too large: {endpoint} takes at most 65,536 bytes"
            f" (got {len(hostile(endpoint)['oversized']):,})",
        )
    for kind in ("nested", "numbers_for_strings", "list_for_object", "non_utf8_bytes"):
        outcome = outcomes[kind]
        assert outcome is not None, kind
        assert outcome[0] == "400", (kind, outcome)
    for kind in ("nested", "nested_oversized"):
        nested = outcomes[kind]
        assert nested is not None
        assert nested[1] == (
            "malformed request: JSON nested too deeply"
            if kind == "nested" or endpoint == "backfill.progress"
            else f"request too large: {endpoint} takes at most 65,536 bytes"
            f" (got {len(hostile(endpoint)[kind]):,})"
        )
    long_value = outcomes["long_value"]
    if endpoint in ("trigger", "runs", "dlq.replay", "backfill"):
        assert long_value is not None
        assert long_value[0] == "404"
        assert long_value[1].startswith(f"unknown source {'y' * 80!r}… (60,000 characters)")
    elif endpoint == "status":
        assert long_value is not None
        assert long_value[0] == "400"
        assert long_value[1].startswith(f"after: no source {'y' * 80!r}… (60,000 characters)")


# -- health --------------------------------------------------------------------------------------


async def test_health_names_a_missing_bucket(
    make_settings: MakeSettings, request_reply: Requester, nats_url: str, bus_prefix: str
) -> None:
    """Every stream the pipeline needs is checked, the buckets' too: the progress bucket
    deleted under a running daemon makes it degraded, naming it."""
    subjects = Subjects(bus_prefix)
    progress = f"KV_{subjects.progress_bucket}"
    async with open_daemon(make_settings(many_sources(1)), roles=("service",)):
        before = msgspec.json.decode((await request_reply("health")).data)
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(progress)
        finally:
            await nc.close()
        after = msgspec.json.decode((await request_reply("health")).data)
        status = msgspec.json.decode((await request_reply("status")).data)

    consumers = [f"{stream}/{durable}" for stream, durable in subjects.consumers]
    assert before["status"] == "ok", before
    assert list(before["checks"]) == [
        "bus",
        "database",
        *subjects.streams,
        *consumers,
        "sources",
    ]
    assert all(check["ok"] for check in before["checks"].values())
    assert after["status"] == "degraded"
    assert after["reason"] == f"{progress}: missing"
    assert after["checks"][progress] == {"ok": False, "detail": "missing"}
    assert after["checks"]["bus"]["ok"] is True
    assert status["bus"] == {"ok": False, "detail": f"JetStream: {progress}: missing"}


async def test_a_backfill_whose_reply_would_not_fit_is_refused_before_queueing(
    make_settings: MakeSettings, request_reply: Requester, nats_url: str, bus_prefix: str
) -> None:
    """8,640 slots of a source with a long name: their run ids alone pass 1 MiB."""
    name = "s" * 120
    source = {"name": name, "url": "http://127.0.0.1:9/never", "schedule": "* * * * *"}
    async with open_daemon(make_settings([source]), roles=("service",)):
        msg = await request_reply(
            "backfill", {"source": name, "start": "2026-01-01", "end": "2026-01-06"}, wait_s=20
        )
        nc = await nats.connect(nats_url)
        try:
            queued = (await nc.jetstream().stream_info(Subjects(bus_prefix).collect_stream)).state
        finally:
            await nc.close()
    assert error_of(msg) == (
        "400",
        "the run ids of 8,640 slots would not fit in one reply; split the range into smaller ones",
    )
    assert queued.messages == 0


async def test_an_unexpected_error_is_a_short_500_logged_once_without_a_traceback(
    make_settings: MakeSettings,
    request_reply: Requester,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug (here: memory running out while reading runs) costs one request, not the service."""

    async def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("while holding postgresql://coleta:hunter2@db/coleta")

    monkeypatch.setattr("daemon.service._endpoints.recent_runs", out_of_memory)
    async with open_daemon(make_settings(many_sources(1)), roles=("service",)):
        msg = await request_reply("runs", {})
        health = await request_reply("health")
    assert error_of(msg) == ("500", "runs failed (MemoryError); see the daemon log")
    assert msgspec.json.decode(msg.data) == {
        "error": {"code": "internal", "message": "runs failed (MemoryError); see the daemon log"}
    }
    assert msgspec.json.decode(health.data)["status"] == "ok"
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "service.internal"
    assert record.exc_info is None
    assert vars(record)["error_type"] == "MemoryError"
    assert vars(record)["where"].startswith("test_service_limits.py:")
    assert "hunter2" not in caplog.text
