"""Pipelined publishes (``Bus.send`` / ``confirm``) on a real NATS: what the server refuses,
and what nats-py would otherwise lose on the way."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest

from contracts import Subjects
from daemon.app import open_daemon
from daemon.errors import PermanentError, TransientError
from daemon.platform.bus import Bus, BusOptions
from tests._collect import finished, source, trigger
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

OPTIONS = BusOptions(max_age_s=600, duplicate_window_s=60)


async def test_a_message_over_max_payload_is_refused_before_it_is_sent(
    nats_url: str, bus_prefix: str
) -> None:
    async with Bus.open(nats_url, Subjects(bus_prefix), OPTIONS) as bus:
        subject = bus.subjects.raw("s")
        with pytest.raises(PermanentError) as refused:
            await bus.send(subject, b"x" * bus.max_payload, msg_id="big", source="s", run_id="r")
        assert refused.value.code == "too_large"
        ack = await bus.confirm(await bus.send(subject, b"{}", msg_id="a", source="s", run_id="r"))
        assert ack.stream == bus.subjects.raw_stream


async def test_sends_the_client_refused_give_their_pending_slots_back(
    nats_url: str, bus_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nats-py takes one of its pending slots before it sends; a send that raises (buffer full
    # while reconnecting) never gave it back, and with every slot gone no publish went out.
    async with Bus.open(nats_url, Subjects(bus_prefix), OPTIONS) as bus:
        bus.js = bus.nc.jetstream(publish_async_max_pending=2)
        subject = bus.subjects.raw("s")
        publish = bus.nc.publish

        async def refuse(*args: Any, **kwargs: Any) -> None:
            raise nats.errors.OutboundBufferLimitError

        monkeypatch.setattr(bus.nc, "publish", refuse)
        for i in range(5):
            with pytest.raises(TransientError, match="outbound buffer limit"):
                await bus.send(subject, b"{}", msg_id=f"lost{i}", source="s", run_id="r")
        monkeypatch.setattr(bus.nc, "publish", publish)
        for i in range(3):
            pending = await bus.send(subject, b"{}", msg_id=f"ok{i}", source="s", run_id="r")
            assert (await bus.confirm(pending)).seq


async def test_a_page_whose_headers_overflow_the_message_goes_through_the_object_store(
    api: LocalAPI, make_settings: MakeSettings, request_reply: Requester, db_conn: Any
) -> None:
    # 600 KB of body fits a message, but not with 270 KB of response headers beside it.
    body = bytes(range(256)) * 2400
    headers = {f"X-Padding-{i}": "p" * 90_000 for i in range(3)}
    api.route("/padded", body=body, content_type="application/octet-stream", headers=headers)
    async with open_daemon(make_settings([source(api, "padded", "/padded")])):
        run_id = await trigger(request_reply, "padded")
        row = await wait_for(lambda: finished(db_conn, run_id), within_s=30)
    assert row["status"] == "stored"
    stored = db_conn.execute("SELECT body FROM collected_data").fetchone()
    assert stored == (body,)


async def test_a_run_that_fails_on_a_later_page_confirms_its_pages_before_failing(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Page 0 is sent, page 1 is a 404: the run fails, but only once page 0 is known to be on
    # the bus. The first confirmation fails: the command is handed back and done again.
    api.route("/pages", json={"items": [1, 2], "has_more": True}, times=1)
    api.route("/pages", status=404, body="gone", times=1)
    api.route("/pages", json={"items": [1, 2], "has_more": True}, times=1)
    api.route("/pages", status=404, body="gone")
    pagination = {"kind": "page", "records_path": "items", "has_more_path": "has_more"}
    settings = make_settings([source(api, "paged", "/pages", pagination=pagination)])
    async with open_daemon(settings) as daemon:
        confirm = daemon.bus.confirm
        refused: list[str] = []

        async def refuse_once(pending: Any) -> Any:
            if not refused:
                refused.append(pending.subject)
                raise TransientError("the bus did not confirm")
            return await confirm(pending)

        monkeypatch.setattr(daemon.bus, "confirm", refuse_once)
        run_id = await trigger(request_reply, "paged")
        row = await wait_for(lambda: finished(db_conn, run_id), within_s=30)
    assert refused == [daemon.bus.subjects.raw("paged")]
    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", "http_status", 2)
    assert db_conn.execute("SELECT page FROM collected_data").fetchall() == [(0,)]
