"""Bursts (``Bus.publish_burst``) on a real NATS: written at once, still acked one by one."""

from __future__ import annotations

import nats
import pytest
from nats.aio.client import Client

from contracts import Subjects
from daemon.errors import BusUnavailable, PermanentError
from daemon.platform.bus import Bus, BusOptions, PubAck, header_block

pytestmark = pytest.mark.anyio

OPTIONS = BusOptions(max_age_s=600, duplicate_window_s=60)
COUNT = 600  # more than one chunk of frames


def burst(bus: Bus, count: int = COUNT) -> list[tuple[str, bytes, bytes]]:
    return [
        (
            bus.subjects.collect(f"s{i}"),
            b'{"n":%d}' % i,
            header_block({"Nats-Msg-Id": f"m{i}", "traceparent": f"00-{i:032x}-{i:016x}-01"}),
        )
        for i in range(count)
    ]


async def test_every_message_of_a_burst_is_acked_once_and_kept_with_its_headers(
    nats_url: str, bus_prefix: str
) -> None:
    async with Bus.open(nats_url, Subjects(bus_prefix), OPTIONS) as bus:
        outcomes = await bus.publish_burst(burst(bus))
        assert all(isinstance(outcome, PubAck) for outcome in outcomes)
        acks = [outcome for outcome in outcomes if isinstance(outcome, PubAck)]
        assert sorted(ack.seq for ack in acks) == list(range(1, COUNT + 1))
        assert {ack.duplicate for ack in acks} == {None}
        # The same burst again: JetStream de-duplicates every message by its Nats-Msg-Id.
        again = await bus.publish_burst(burst(bus))
        assert {outcome.duplicate for outcome in again if isinstance(outcome, PubAck)} == {True}
        js = bus.js
        info = await js.stream_info(bus.subjects.collect_stream)
        assert info.state.messages == COUNT
        stored = await js.get_msg(bus.subjects.collect_stream, 7)
    i = int((stored.subject or "").rsplit("s", 1)[1])
    assert stored.data == b'{"n":%d}' % i
    assert stored.headers == {"Nats-Msg-Id": f"m{i}", "traceparent": f"00-{i:032x}-{i:016x}-01"}


async def test_a_burst_while_disconnected_is_refused_message_by_message(
    nats_url: str, bus_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Bus.open(nats_url, Subjects(bus_prefix), OPTIONS) as bus:
        await bus.publish_burst(burst(bus, 10))  # the acks' subscription is made
        monkeypatch.setattr(Client, "is_connected", property(lambda self: False))
        outcomes = await bus.publish_burst(burst(bus, 10))
        monkeypatch.undo()
        assert [type(outcome) for outcome in outcomes] == [BusUnavailable] * 10
        assert str(outcomes[0]) == f"publish to {bus.subjects.collect('s0')}: not connected to NATS"


async def test_a_bad_subject_is_refused_alone_and_the_connection_survives(
    nats_url: str, bus_prefix: str
) -> None:
    async with Bus.open(nats_url, Subjects(bus_prefix), OPTIONS) as bus:
        messages = burst(bus, 10)
        messages[3] = (messages[3][0] + " INJECTED", *messages[3][1:])
        outcomes = await bus.publish_burst(messages)
        assert isinstance(outcomes[3], BusUnavailable)
        assert "bad subject" in str(outcomes[3])
        assert sum(isinstance(outcome, PubAck) for outcome in outcomes) == 9
        assert bus.connected
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().stream_info(bus.subjects.collect_stream)
        finally:
            await nc.close()
        assert info.state.messages == 9


async def test_a_message_over_max_payload_fails_the_burst_before_it_is_written(
    nats_url: str, bus_prefix: str
) -> None:
    async with Bus.open(nats_url, Subjects(bus_prefix), OPTIONS) as bus:
        messages = burst(bus, 10)
        messages[0] = (messages[0][0], b"x" * bus.max_payload, messages[0][2])
        with pytest.raises(PermanentError) as refused:
            await bus.publish_burst(messages)
        assert refused.value.code == "too_large"
