"""The request-reply service as `nats req` sees it: replies, errors, discovery."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
import psycopg
import pytest
from nats import micro
from nats.micro.request import Request

from contracts import Subjects
from daemon.app import open_daemon
from daemon.service._service import count_service_error
from tests._collect import run_status
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


def has_status(db: psycopg.Connection[Any], run_id: str, status: str) -> bool:
    return run_status(db, run_id) == status


def sources(api: LocalAPI) -> list[dict[str, Any]]:
    return [
        {
            "name": "good",
            "url": api.url("/good"),
            "schedule": "0 6 * * *",
            "timezone": "Europe/Lisbon",
        },
        {"name": "broken", "url": api.url("/broken"), "schedule": "*/15 * * * *"},
    ]


async def test_status_runs_and_health_replies(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    bus_prefix: str,
) -> None:
    api.route("/good", json={"v": 1})
    api.route("/broken", status=404, body="gone")
    async with open_daemon(make_settings(sources(api))):
        ids = []
        for name in ("good", "broken", "broken"):
            reply = msgspec.json.decode((await request_reply("trigger", {"source": name})).data)
            ids.append(reply["run_id"])
        for run_id, final in zip(ids, ("stored", "failed", "failed"), strict=True):
            await wait_for(functools.partial(has_status, db_conn, run_id, final))

        status = msgspec.json.decode((await request_reply("status")).data)
        health = msgspec.json.decode((await request_reply("health")).data)
        runs = msgspec.json.decode((await request_reply("runs", {"limit": 2})).data)
        only_good = msgspec.json.decode((await request_reply("runs", {"source": "good"})).data)

    assert status["version"]
    assert status["uptime_s"] >= 0
    assert status["bus"]["ok"] is True
    assert status["database"]["ok"] is True
    by_name = {s["name"]: s for s in status["sources"]}
    assert list(by_name) == ["good", "broken"]
    good, broken = by_name["good"], by_name["broken"]
    assert good["schedule"] == "0 6 * * *"
    assert good["timezone"] == "Europe/Lisbon"
    next_run = datetime.fromisoformat(good["next_run"])
    assert next_run > datetime.now(UTC)
    assert next_run.astimezone().minute == 0
    assert good["last_run"]["status"] == "stored"
    assert good["last_run"]["rows"] == 1
    assert good["rows"] == 1
    assert good["consecutive_failures"] == 0
    assert broken["last_run"]["status"] == "failed"
    assert "HTTP 404" in broken["last_run"]["error"]
    assert broken["consecutive_failures"] == 2
    assert broken["rows"] == 0

    subjects = Subjects(bus_prefix)
    consumers = [f"{stream}/{durable}" for stream, durable in subjects.consumers]
    assert health == {
        "status": "ok",
        "reason": "",
        "checks": {
            "bus": {"ok": True, "detail": "connected"},
            "database": {"ok": True, "detail": "reachable"},
            **{name: {"ok": True, "detail": "ok"} for name in [*subjects.streams, *consumers]},
            # broken failed twice: below failures_before_degraded (3)
            "sources": {"ok": True, "detail": "ok"},
        },
        "late": [],
        "failing": [],
    }
    assert broken["failing"] is False
    assert broken["late"] is False
    assert good["freshness_s"] == 26 * 3600  # daily: 24 h and a margin of 2 h
    assert broken["freshness_s"] == 25 * 60  # every 15 minutes: and a margin of 10 min
    assert 0 <= good["freshness_age_s"] < 60  # since its stored run
    assert [r["run_id"] for r in runs["runs"]] == [ids[2], ids[1]]  # newest first, limited
    assert [r["run_id"] for r in only_good["runs"]] == [ids[0]]
    (good_run,) = only_good["runs"]
    assert good_run["trigger"] == "manual"
    assert good_run["http_status"] == 200
    assert len(good_run["trace_id"]) == 32


@pytest.mark.parametrize(
    ("endpoint", "body", "code", "message"),
    [
        ("trigger", b"", "bad_request", "empty request"),
        ("trigger", b'{"source": ', "bad_request", "malformed JSON"),
        ("trigger", b"not a name!", "bad_request", "malformed request"),
        ("trigger", b'{"source": "nope"}', "unknown_source", "unknown source 'nope'"),
        (
            "trigger",
            b'{"source": "good", "scheduled_for": "yesterday"}',
            "bad_request",
            "scheduled_for",
        ),
        (
            "trigger",
            b'{"source": "good", "scheduled_for": "2026-11-01T06:00:00"}',
            "bad_request",
            "timezone",
        ),
        ("trigger", b'{"sauce": "good"}', "bad_request", "source"),
        ("runs", b'{"limit": 0}', "bad_request", "limit"),
        ("runs", b'{"source": "nope"}', "unknown_source", "unknown source 'nope'"),
        ("runs", b'{"limit": ', "bad_request", "malformed JSON"),
    ],
)
async def test_bad_requests_get_error_replies_and_the_daemon_keeps_serving(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    endpoint: str,
    body: bytes,
    code: str,
    message: str,
) -> None:
    async with open_daemon(make_settings(sources(api))):
        reply = await request_reply(endpoint, body)
        after = await request_reply("health")
    headers = reply.headers or {}
    assert headers["Nats-Service-Error-Code"] == ("404" if code == "unknown_source" else "400")
    assert message in headers["Nats-Service-Error"]
    error = msgspec.json.decode(reply.data)["error"]
    assert error["code"] == code
    assert message in error["message"]
    assert "Traceback" not in error["message"]
    assert msgspec.json.decode(after.data)["status"] == "ok"


async def test_health_is_degraded_with_the_reason_when_the_database_is_gone(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester
) -> None:
    async with open_daemon(make_settings(sources(api))) as daemon:
        await daemon.db.pool.close()
        health = msgspec.json.decode((await request_reply("health")).data)
        status = msgspec.json.decode((await request_reply("status")).data)
    assert health["status"] == "degraded"
    assert health["reason"].startswith("database: ")
    assert health["checks"]["bus"]["ok"] is True
    assert health["checks"]["database"]["ok"] is False
    assert status["database"]["ok"] is False
    assert [s["name"] for s in status["sources"]] == ["good", "broken"]


async def test_the_service_is_discoverable_with_the_micro_protocol(
    api: LocalAPI, make_settings: MakeSettings, nats_url: str, bus_prefix: str
) -> None:
    async with open_daemon(make_settings(sources(api))):
        nc = await nats.connect(nats_url)
        try:
            info = json.loads((await nc.request(f"$SRV.INFO.{bus_prefix}", b"", timeout=2)).data)
            ping = json.loads((await nc.request(f"$SRV.PING.{bus_prefix}", b"", timeout=2)).data)
            await nc.request(f"{bus_prefix}.status", b"", timeout=2)
            stats = json.loads((await nc.request(f"$SRV.STATS.{bus_prefix}", b"", timeout=2)).data)
        finally:
            await nc.close()
    assert ping["name"] == bus_prefix
    assert info["type"] == "io.nats.micro.v1.info_response"
    subjects = {e["name"]: e["subject"] for e in info["endpoints"]}
    assert subjects == {
        **{name: f"{bus_prefix}.{name}" for name in ("status", "trigger", "runs", "health")},
        "dlq_replay": f"{bus_prefix}.dlq.replay",
        "backfill": f"{bus_prefix}.backfill",
        "backfill_progress": f"{bus_prefix}.backfill.progress",
    }
    requests = {e["name"]: e["num_requests"] for e in stats["endpoints"]}
    assert requests["status"] == 1


async def test_error_replies_count_in_the_micro_stats(
    api: LocalAPI, make_settings: MakeSettings, nats_url: str, bus_prefix: str
) -> None:
    async with open_daemon(make_settings(sources(api))):
        nc = await nats.connect(nats_url)
        try:
            await nc.request(f"{bus_prefix}.trigger", b'{"source": "nope"}', timeout=2)
            stats = json.loads((await nc.request(f"$SRV.STATS.{bus_prefix}", b"", timeout=2)).data)
        finally:
            await nc.close()
    trigger = {e["name"]: e for e in stats["endpoints"]}["trigger"]
    assert trigger["num_requests"] == 1
    assert trigger["num_errors"] == 1
    assert trigger["last_error"] == "404:unknown source 'nope' (configured: good, broken)"


# -- $SRV.STATS counts the errors the service answers


@pytest.mark.parametrize("counted", [False, True])
async def test_error_replies_count_in_micro_stats(
    nats_url: str, bus_prefix: str, counted: bool
) -> None:
    """nats-py counts only raised errors; ``count_service_error`` counts an answered one."""
    nc = await nats.connect(nats_url)
    try:
        svc = await micro.add_service(nc, name=bus_prefix, version="0.0.1")

        async def handler(request: Request) -> None:
            await request.respond_error("404", "unknown source 'x'", data=b'{"error": {}}')
            if counted:
                count_service_error(svc, "trigger", "404", "unknown source 'x'")

        await svc.add_endpoint(name="trigger", subject=f"{bus_prefix}.trigger", handler=handler)
        reply = await nc.request(f"{bus_prefix}.trigger", b"x", timeout=2)
        stats = msgspec.json.decode(
            (await nc.request(f"$SRV.STATS.{bus_prefix}", b"", timeout=2)).data
        )
        await svc.stop()
    finally:
        await nc.close()
    assert reply.data == b'{"error": {}}'  # the body is ours either way
    assert (reply.headers or {})["Nats-Service-Error-Code"] == "404"
    (endpoint,) = stats["endpoints"]
    assert endpoint["num_requests"] == 1
    assert endpoint["num_errors"] == (1 if counted else 0)
    assert endpoint["last_error"] == ("404:unknown source 'x'" if counted else "")


def test_count_service_error_ignores_unknown_shapes() -> None:
    # Not a micro Service at all: the private attributes it relies on are absent.
    count_service_error(object(), "trigger", "500", "x")  # type: ignore[arg-type]  # on purpose
