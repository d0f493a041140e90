"""A source's lease across its runs: taken for each run, released after it (the release is not
waited for), taken again by the next run of the source in one compare-and-set."""

from __future__ import annotations

import functools
import threading
from typing import Any

import nats
import nats.js.errors
import pytest

from contracts import Subjects
from daemon.app import open_daemon
from tests._collect import finished, source, trigger
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_faults import eventually
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio


async def lease_holder(nats_url: str, prefix: str, name: str) -> str | None:
    """The run id holding ``name``'s lease, or None when it is free."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(Subjects(prefix).leases_bucket)
        try:
            entry = await kv.get(name)
        except nats.js.errors.NotFoundError:  # never taken, or released
            return None
        return (entry.value or b"").decode() or None
    finally:
        await nc.close()


def fetching(api: LocalAPI, before: int) -> bool:
    return len(api.hits("/leased")) > before


async def test_each_run_takes_the_lease_and_leaves_it_free(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    nats_url: str,
    bus_prefix: str,
) -> None:
    # Each run's answer is held until the test has read the lease it holds.
    gates = [threading.Event() for _ in range(3)]
    for gate in gates:
        api.route("/leased", json={"ok": True}, gate=gate, times=1)
    async with open_daemon(make_settings([source(api, "leased", "/leased")])):
        for i, gate in enumerate(gates):
            run_id = await trigger(request_reply, "leased")
            await wait_for(functools.partial(fetching, api, i), what="the run fetching")
            assert await lease_holder(nats_url, bus_prefix, "leased") == run_id
            gate.set()
            done = await wait_for(functools.partial(finished, db_conn, run_id), what="the run")
            assert done["status"] == "stored"
            held = await eventually(
                lambda: lease_holder(nats_url, bus_prefix, "leased"),
                until=lambda holder: holder is None,
                what="the lease released",
            )
            assert held is None
    assert len(api.hits("/leased")) == 3
