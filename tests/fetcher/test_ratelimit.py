"""Per-host rate limits: ``rate_limit`` pacing shared by sources, and holds the API asks for."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from daemon.app import open_daemon
from daemon.fetcher._ratelimit import HostGates, reset_after
from tests._collect import source, trigger
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI, Route, Seen

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}, 1.0),
        ({"RateLimit-Remaining": "0", "RateLimit-Reset": "30"}, 30.0),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000012"}, 12.0),  # epoch
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1699999990"}, 0.0),  # past
        ({"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "1"}, None),
        ({"X-RateLimit-Remaining": "0"}, None),  # no reset: nothing to go by
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "soon"}, None),
        ({}, None),
    ],
)
def test_reset_after_reads_both_header_families(
    headers: dict[str, str], expected: float | None
) -> None:
    assert reset_after(httpx.Headers(headers), now=1_700_000_000.0) == expected


async def test_a_gate_spaces_requests_to_one_host_and_not_to_others() -> None:
    gates = HostGates()
    started = anyio.current_time()
    for _ in range(6):
        await gates.acquire("a.example", 0.05)
    await gates.acquire("b.example", 0.05)  # another host does not wait
    assert 0.25 <= anyio.current_time() - started < 0.4
    # A request without a rate (a next-page URL) keeps the host's pace.
    before = anyio.current_time()
    await gates.acquire("a.example")
    assert anyio.current_time() - before >= 0.04


async def test_a_hold_stops_every_request_to_the_host_until_it_ends() -> None:
    gates = HostGates()
    gates.hold("a.example", 0.3)
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(gates.acquire, "a.example")
    assert 0.28 <= anyio.current_time() - started < 0.5


class TimedAPI(LocalAPI):
    """Remembers when each request arrived (monotonic seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    def _take(self, path: str, seen: Seen) -> Route:
        self.arrivals.append(time.monotonic())
        return super()._take(path, seen)


@pytest.fixture
def timed() -> Iterator[TimedAPI]:
    server = TimedAPI()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stored(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM collection_runs WHERE status = 'stored'").fetchone()
    return int(row[0]) if row else 0


async def test_sources_on_one_host_share_its_rate_limit(
    timed: TimedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    timed.route("/a", json={"a": 1})
    timed.route("/b", json={"b": 1})
    sources = [source(timed, name, f"/{name}", rate_limit="5/s") for name in ("a", "b")]
    async with open_daemon(make_settings(sources)):
        started = time.monotonic()
        for _ in range(5):
            await trigger(request_reply, "a")
            await trigger(request_reply, "b")
        await wait_for(lambda: stored(db_conn) == 10, within_s=30)
        took = time.monotonic() - started
    arrivals = sorted(timed.arrivals)
    assert len(arrivals) == 10
    assert took >= 1.75, took
    # No more than 5 requests in any 1-second window. Arrivals are stamped by the API's thread,
    # which shares the GIL with the daemon: 100 ms are allowed for a stamp taken late on a busy
    # machine (a 6/s pace would still fail, at 0.83 s).
    assert all(
        later - earlier >= 0.9 for earlier, later in zip(arrivals, arrivals[5:], strict=False)
    )


async def test_remaining_zero_holds_the_host_until_the_reset(
    timed: TimedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    timed.route(
        "/quota",
        json={"n": 1},
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"},
        times=1,
    )
    timed.route("/quota", json={"n": 2})
    async with open_daemon(make_settings([source(timed, "quota", "/quota")])):
        await trigger(request_reply, "quota")
        await wait_for(lambda: stored(db_conn) == 1)
        await trigger(request_reply, "quota")
        await wait_for(lambda: stored(db_conn) == 2)
    first, second = timed.arrivals
    assert second - first >= 0.95, second - first


async def test_a_429_with_retry_after_holds_the_other_sources_of_the_host_too(
    timed: TimedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    timed.route("/busy", status=429, headers={"Retry-After": "1"}, times=1)
    timed.route("/busy", json={"ok": 1})
    timed.route("/other", json={"ok": 2})
    retries = {"max_attempts": 3, "max_backoff_s": 0.1}
    sources = [source(timed, name, f"/{name}", retries=retries) for name in ("busy", "other")]
    async with open_daemon(make_settings(sources)):
        await trigger(request_reply, "busy")
        await wait_for(lambda: timed.hits("/busy"))
        await trigger(request_reply, "other")
        await wait_for(lambda: stored(db_conn) == 2)
    paths = [seen.path for seen in timed.requests]
    assert sorted(paths) == ["/busy", "/busy", "/other"]
    assert paths[0] == "/busy"
    # "other" was asked for at once, but waited for the hold on the host to end.
    assert timed.arrivals[paths.index("/other")] - timed.arrivals[0] >= 0.95
