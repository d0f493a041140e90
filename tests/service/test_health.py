"""``coleta.health`` checks what the pipeline needs on the bus: each stream and bucket (see
``test_service_limits``) and each durable consumer, naming the one that is gone."""

from __future__ import annotations

import msgspec
import nats
import pytest

from contracts import Subjects
from daemon.app import open_daemon
from tests._collect import many_sources
from tests.fix_daemon import MakeSettings, Requester

pytestmark = pytest.mark.anyio


async def test_health_names_a_missing_consumer(
    make_settings: MakeSettings, request_reply: Requester, nats_url: str, bus_prefix: str
) -> None:
    """Without the fetcher's durable consumer no command is fetched and every run stalls;
    health said ok, as it checked only the streams."""
    subjects = Subjects(bus_prefix)
    fetcher = f"{subjects.collect_stream}/{subjects.fetcher_consumer}"
    # The service alone: no fetcher here declares its consumer again.
    async with open_daemon(make_settings(many_sources(1)), roles=("service",)):
        before = msgspec.json.decode((await request_reply("health")).data)
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_consumer(subjects.collect_stream, subjects.fetcher_consumer)
        finally:
            await nc.close()
        after = msgspec.json.decode((await request_reply("health")).data)
        status = msgspec.json.decode((await request_reply("status")).data)

    assert before["status"] == "ok", before
    assert before["checks"][fetcher] == {"ok": True, "detail": "ok"}
    assert after["status"] == "degraded"
    assert after["reason"] == f"{fetcher}: missing"
    assert after["checks"][fetcher] == {"ok": False, "detail": "missing"}
    runs = f"{subjects.collect_stream}/{subjects.runs_consumer}"
    assert after["checks"][runs] == {"ok": True, "detail": "ok"}
    assert status["bus"] == {"ok": False, "detail": f"JetStream: {fetcher}: missing"}
