"""The delivery promise under faults, on real servers.

"For every scheduled slot of every source, the response is stored in PostgreSQL exactly once,
or the run is recorded as failed with the reason. No fault below loses a run, duplicates a
row, or needs an operator to restart anything. The daemon reconnects with backoff on its own,
reports ``degraded`` in ``coleta.health`` while a dependency is down, and resumes without
losing what was in flight."

Each test breaks one thing in the middle of runs — the daemon (SIGKILL), PostgreSQL, NATS —
or runs two replicas side by side, then checks what a user would check: every run ``stored``
with exactly one row, and nothing left unacknowledged on the bus.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.js.errors
import pytest

from contracts import Subjects
from daemon.app import open_daemon
from daemon.platform.embedded import read_state_urls, with_password
from tests._collect import source
from tests.fix_daemon import MakeSettings, wait_for
from tests.fix_faults import (
    DaemonFactory,
    NatsServer,
    PostgresServer,
    Runs,
    connect_db,
    eventually,
    read_runs,
    request,
    request_json,
    wait_runs,
)
from tests.fix_http import LocalAPI
from tests.fix_pg import server_state_dir

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

#: Short, so a run held by a dead process is redelivered within the test.
ACK_WAIT_S = 3
#: One source, runs of it allowed to overlap, so several are in flight at once.
SLOW = {"name": "slow", "schedule": "0 0 1 1 *", "allow_overlap": True}


async def trigger(nats_url: str, prefix: str, n: int, source: str = "slow") -> list[str]:
    """Queue ``n`` manual runs of ``source``, as ``coleta trigger`` does; their run ids."""
    return [
        (await request_json(nats_url, f"{prefix}.trigger", source.encode()))["run_id"]
        for _ in range(n)
    ]


async def health(nats_url: str, prefix: str) -> dict[str, Any]:
    reply: dict[str, Any] = await request_json(nats_url, f"{prefix}.health")
    return reply


def health_is(status: str) -> Any:
    return lambda reply: reply["status"] == status


async def bus_settled(nats_url: str, prefix: str) -> bool:
    """True when every durable consumer has delivered everything and had it acked."""
    s = Subjects(prefix)
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for stream, consumer in (
            (s.collect_stream, s.fetcher_consumer),
            (s.collect_stream, s.runs_consumer),
            (s.raw_stream, s.writer_consumer),
        ):
            info = await js.consumer_info(stream, consumer)
            if info.num_pending or info.num_ack_pending:
                return False
        return True
    finally:
        await nc.close()


async def raw_pages(nats_url: str, prefix: str) -> int:
    """How many pages the fetchers have published (a run's other events not counted)."""
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    stream = Subjects(prefix).raw_stream
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        pages = 0
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                event = msgspec.json.decode((await js.get_msg(stream, seq)).data or b"{}")
                pages += event.get("kind") == "page"
        return pages
    finally:
        await nc.close()


async def writer_redeliveries(nats_url: str, prefix: str) -> dict[str, int]:
    """Per writer consumer (``runs``, ``writer``): deliveries beyond the first of each message.

    Each delivery takes a consumer sequence number; a redelivery takes one but no stream
    sequence (``num_redelivered`` counts only those still unacknowledged).
    """
    s = Subjects(prefix)
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        found = {}
        for stream, consumer in (
            (s.collect_stream, s.runs_consumer),
            (s.raw_stream, s.writer_consumer),
        ):
            delivered = (await js.consumer_info(stream, consumer)).delivered
            assert delivered is not None
            found[consumer] = (delivered.consumer_seq or 0) - (delivered.stream_seq or 0)
        return found
    finally:
        await nc.close()


def stored(run_ids: list[str]) -> Any:
    return lambda runs: set(run_ids) <= runs.stored()


def assert_stored_exactly_once(runs: Runs, run_ids: list[str]) -> None:
    assert runs.status == dict.fromkeys(run_ids, "stored")
    assert runs.rows == dict.fromkeys(run_ids, 1)
    assert runs.total_rows == len(run_ids)


def config_toml(prefix: str, schema: str, state_dir: Path, url: str, **top: Any) -> str:
    """A config file for ``coleta run``: the test's namespace, ``top`` settings, SLOW at url."""
    lines = [f"{key} = {value!r}" for key, value in top.items()]
    source = [f"{key} = {msgspec.json.encode(value).decode()}" for key, value in SLOW.items()]
    return "\n".join(
        [
            f'bus_prefix = "{prefix}"',
            f'database_schema = "{schema}"',
            f'state_dir = "{state_dir}"',
            *lines,
            "[[sources]]",
            *source,
            f'url = "{url}"',
            "",
        ]
    )


# --- 1. the daemon killed -------------------------------------------------------------------


@pytest.mark.parametrize("servers", ["configured", "embedded"])
async def test_daemon_killed_mid_run_redoes_the_runs_in_flight_once(
    api: LocalAPI,
    daemon_processes: DaemonFactory,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    tmp_path: Path,
    servers: str,
) -> None:
    """SIGKILL leaves no chance to hand anything back: JetStream redelivers after ack_wait.

    ``embedded``: the no-infrastructure default, where the killed daemon also leaves its
    nats-server and PostgreSQL behind, for the next start to take over (or replace).
    """
    # The first wave (four runs, four at a time) takes a second; every later fetch is held
    # until the daemon is killed, so the runs in flight are certainly cut off mid-fetch.
    held = threading.Event()
    api.route("/slow", json={"slow": True}, delay_s=1.0, times=4)
    api.route("/slow", json={"slow": True}, gate=held)
    with server_state_dir("fault-kill") as state_dir:
        config = config_toml(
            bus_prefix,
            db_schema,
            state_dir,
            api.url("/slow"),
            ack_wait_s=ACK_WAIT_S,
            max_concurrent_fetches=4,
        )
        env = (
            {"NATS_URL": nats_url, "DATABASE_URL": database_url} if servers == "configured" else {}
        )
        daemon = daemon_processes("daemon", config, **env)

        async def start() -> tuple[str, str]:
            daemon.start()
            await daemon.wait_ready()
            if servers == "configured":
                return nats_url, database_url
            urls = read_state_urls(state_dir)
            assert urls.nats_url is not None
            assert urls.nats_auth is not None
            assert urls.database_url is not None
            return with_password(urls.nats_url, urls.nats_auth), urls.database_url

        bus, db = await start()
        run_ids = await trigger(bus, bus_prefix, 8)
        # Kill once the first wave is stored and the second is held mid-fetch.
        killed = await wait_runs(
            db,
            db_schema,
            lambda runs: bool(runs.stored()) and len(api.hits("/slow")) >= 6,
            what="the first wave stored, the second in flight",
        )
        assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
        held.set()
        assert len(killed.stored()) < len(run_ids)

        bus, db = await start()  # same config: the same streams and durable consumers
        await wait_runs(db, db_schema, stored(run_ids), what="every run stored")
        await eventually(lambda: bus_settled(bus, bus_prefix), what="the bus settled")
        runs = await read_runs(db, db_schema)
        assert daemon.kill(signal.SIGTERM) == 0
    assert_stored_exactly_once(runs, run_ids)
    # The runs cut off mid-fetch were redelivered and fetched again, as attempt 2.
    assert sum(runs.attempts[run] >= 2 for run in run_ids) >= 2
    assert len(api.hits("/slow")) > len(run_ids)


# --- 2. PostgreSQL restarted ----------------------------------------------------------------

#: How long PostgreSQL stays down: past several reconnection attempts of a doubling backoff.
PG_OUTAGE_S = 8.0
#: Longer than a connection is awaited from the pool (30 s): the write fails with
#: StoreUnavailable, again and again, for as long as the outage lasts.
PG_LONG_OUTAGE_S = 40.0
#: How soon after PostgreSQL is back the daemon must be healthy and writing again: the pool's
#: next attempt (at most ~2 s away inside a RECONNECT_ROUND_S round) or the writer's next try of
#: a held batch (at most 4 s away), with room for a loaded machine. Far below the outage.
RESUME_WITHIN_S = 10.0


@pytest.mark.parametrize(
    "outage_s",
    [
        pytest.param(PG_OUTAGE_S, id="brief"),
        pytest.param(PG_LONG_OUTAGE_S, id="past-the-pool-timeout"),
    ],
)
async def test_postgres_down_mid_run_then_back_every_run_is_stored_once(
    api: LocalAPI,
    make_settings: MakeSettings,
    private_postgres: PostgresServer,
    nats_url: str,
    bus_prefix: str,
    outage_s: float,
) -> None:
    api.route("/slow", json={"slow": True}, delay_s=0.5)
    db_url, schema = private_postgres.url, "coleta"
    settings = make_settings(
        [SLOW | {"url": api.url("/slow")}],
        database_url=db_url,
        database_schema=schema,
        ack_wait_s=ACK_WAIT_S,
    )
    async with open_daemon(settings):
        assert (await health(nats_url, bus_prefix))["status"] == "ok"
        first = await trigger(nats_url, bus_prefix, 3)
        await wait_for(lambda: len(api.hits("/slow")) >= 3, what="runs in flight")
        await private_postgres.stop()
        stopped_at = anyio.current_time()

        down = await eventually(
            lambda: health(nats_url, bus_prefix), until=health_is("degraded"), what="degraded"
        )
        # Why, in libpq's words: 'connection to server on socket "…" failed: No such file…'
        assert down["reason"].startswith("database: "), down
        assert "connection to server" in down["reason"], down
        assert down["checks"]["database"]["ok"] is False
        assert down["checks"]["bus"]["ok"] is True

        # Runs go on while the database is down: fetched and published, waiting to be written.
        second = await trigger(nats_url, bus_prefix, 3)
        await eventually(
            lambda: raw_pages(nats_url, bus_prefix),
            until=lambda n: n >= 6,
            what="every run fetched (a page each)",
        )
        while anyio.current_time() - stopped_at < outage_s:
            assert (await health(nats_url, bus_prefix))["status"] == "degraded"
        await private_postgres.start()

        back = await eventually(
            lambda: health(nats_url, bus_prefix),
            until=health_is("ok"),
            within_s=RESUME_WITHIN_S,
            what="health ok again",
        )
        assert back["checks"]["database"] == {"ok": True, "detail": "reachable"}
        await wait_runs(
            db_url, schema, stored(first + second), within_s=RESUME_WITHIN_S, what="runs stored"
        )
        await eventually(lambda: bus_settled(nats_url, bus_prefix), what="the bus settled")
        # The writer held its batches through the outage, kept alive with in_progress: no
        # message was handed back or redelivered (each nak would count as a delivery).
        assert await writer_redeliveries(nats_url, bus_prefix) == {"runs": 0, "writer": 0}
    assert_stored_exactly_once(await read_runs(db_url, schema), first + second)
    assert len(api.hits("/slow")) == 6  # the outage cost no second fetch


async def test_a_daemon_stopped_while_postgres_is_down_hands_its_batches_back(
    api: LocalAPI,
    make_settings: MakeSettings,
    private_postgres: PostgresServer,
    nats_url: str,
    bus_prefix: str,
) -> None:
    """The writer holds its batch while PostgreSQL is down; stopping then hands the messages
    back at once (one nak), rather than leaving them to ``ack_wait`` (long here)."""
    api.route("/slow", json={"slow": True})
    db_url, schema = private_postgres.url, "coleta"
    settings = make_settings(
        [SLOW | {"url": api.url("/slow")}],
        database_url=db_url,
        database_schema=schema,
        ack_wait_s=60,
    )
    async with open_daemon(settings):
        await private_postgres.stop()
        run_ids = await trigger(nats_url, bus_prefix, 2)
        await eventually(
            lambda: raw_pages(nats_url, bus_prefix), until=lambda n: n >= 2, what="runs fetched"
        )
        stopping = anyio.current_time()
    assert anyio.current_time() - stopping < settings.shutdown_grace_s + 5
    await private_postgres.start()
    async with open_daemon(settings):
        await wait_runs(db_url, schema, stored(run_ids), within_s=15, what="runs stored")
        await eventually(lambda: bus_settled(nats_url, bus_prefix), what="the bus settled")
    assert_stored_exactly_once(await read_runs(db_url, schema), run_ids)


# --- 3. nats-server restarted ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "outage_s"),
    [
        pytest.param(signal.SIGTERM, 1.5, id="sigterm-brief"),
        # Longer than a JetStream publish waits for its ack (5 s): publishing the payloads of
        # the runs in flight fails, and they are handed back.
        pytest.param(signal.SIGKILL, 6.0, id="sigkill-past-publish-timeout"),
    ],
)
async def test_nats_restarted_mid_run_every_run_is_stored_once(
    api: LocalAPI,
    make_settings: MakeSettings,
    private_nats: NatsServer,
    database_url: str,
    db_schema: str,
    bus_prefix: str,
    stop: signal.Signals,
    outage_s: float,
) -> None:
    api.route("/slow", json={"slow": True}, delay_s=1.0)
    url = private_nats.url
    settings = make_settings(
        [SLOW | {"url": api.url("/slow")}],
        nats_url=url,
        ack_wait_s=ACK_WAIT_S,
        max_concurrent_fetches=4,
    )
    async with open_daemon(settings) as daemon:
        first = await trigger(url, bus_prefix, 4)
        await wait_for(lambda: len(api.hits("/slow")) >= 4, what="runs in flight")
        await private_nats.stop(stop)
        await wait_for(lambda: not daemon.bus.connected, what="the daemon disconnected")
        await anyio.sleep(outage_s)  # the outage itself: the runs in flight finish meanwhile
        await private_nats.start()  # same port, same JetStream store

        await wait_runs(database_url, db_schema, stored(first), what="runs in flight stored")
        # Intake works after the restart: new commands are taken, fetched and stored.
        after = await trigger(url, bus_prefix, 2)
        await wait_runs(database_url, db_schema, stored(after), what="new runs stored")
        assert (await health(url, bus_prefix))["status"] == "ok"
        await eventually(lambda: bus_settled(url, bus_prefix), what="the bus settled")
    assert_stored_exactly_once(await read_runs(database_url, db_schema), first + after)
    assert private_nats.starts == 2


async def test_nats_restarted_without_its_store_the_daemon_declares_again(
    api: LocalAPI,
    make_settings: MakeSettings,
    private_nats: NatsServer,
    database_url: str,
    db_schema: str,
    bus_prefix: str,
) -> None:
    """A server back without its JetStream store (no volume, a wiped disk) has no streams and
    no consumers: the daemon declares them again by itself. The run in flight is stored; runs
    only queued in the lost store are gone with it (they stay ``queued`` in PostgreSQL)."""
    held = threading.Event()  # the run in flight answers once the store is gone
    api.route("/slow", json={"slow": True}, gate=held)
    url = private_nats.url
    settings = make_settings([SLOW | {"url": api.url("/slow")}], nats_url=url)
    async with open_daemon(settings):
        in_flight = await trigger(url, bus_prefix, 1)
        await wait_for(lambda: len(api.hits("/slow")) == 1, what="the run in flight")
        await private_nats.stop(signal.SIGKILL)
        shutil.rmtree(private_nats.store_dir)
        await private_nats.start()
        held.set()

        await wait_runs(database_url, db_schema, stored(in_flight), what="the run in flight")
        after = await eventually(
            lambda: try_trigger(url, bus_prefix), until=bool, what="a trigger accepted"
        )
        assert after is not None
        await wait_runs(database_url, db_schema, stored([after]), what="a new run stored")
        assert (await health(url, bus_prefix))["status"] == "ok"
        await eventually(lambda: bus_settled(url, bus_prefix), what="the bus settled")
    assert_stored_exactly_once(await read_runs(database_url, db_schema), [*in_flight, after])


async def try_trigger(nats_url: str, prefix: str) -> str | None:
    """A run id, or None while the daemon answers ``unavailable``."""
    reply = await request(nats_url, f"{prefix}.trigger", b"slow")
    if (reply.headers or {}).get("Nats-Service-Error-Code") == "503":
        return None
    run_id: str = msgspec.json.decode(reply.data)["run_id"]
    return run_id


# --- 4. two replicas ------------------------------------------------------------------------


async def test_two_replicas_share_the_work_and_answer_alike(
    api: LocalAPI,
    daemon_processes: DaemonFactory,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    tmp_path: Path,
) -> None:
    api.route("/slow", json={"slow": True}, delay_s=0.2)
    config = config_toml(  # per-run lines (fetch.done) are debug
        bus_prefix,
        db_schema,
        tmp_path / "state",
        api.url("/slow"),
        max_concurrent_fetches=4,
        log_level="DEBUG",
    )
    env = {"NATS_URL": nats_url, "DATABASE_URL": database_url}
    replicas = [daemon_processes(name, config, **env) for name in ("a", "b")]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        await replica.wait_ready()

    run_ids = await trigger(nats_url, bus_prefix, 20)
    await wait_runs(database_url, db_schema, stored(run_ids), what="every run stored")
    await eventually(lambda: bus_settled(nats_url, bus_prefix), what="the bus settled")
    assert_stored_exactly_once(await read_runs(database_url, db_schema), run_ids)

    done = [{e["run_id"] for e in replica.events("fetch.done")} for replica in replicas]
    assert all(done), f"one replica did all the work: {[len(d) for d in done]}"
    assert done[0].isdisjoint(done[1])
    assert done[0] | done[1] == set(run_ids)
    assert len(api.hits("/slow")) == len(run_ids)  # no run fetched twice

    # Both replicas serve <prefix>.status in one queue group: every reply is the same but
    # for uptime and the time since the last stored run, and the per-instance $SRV.STATS
    # show that both answered some of them.
    replies = [await request_json(nats_url, f"{bus_prefix}.status") for _ in range(20)]
    for reply in replies:
        reply.pop("uptime_s")
        for status in reply["sources"]:
            assert status.pop("freshness_age_s") >= 0
    assert all(reply == replies[0] for reply in replies)
    (source,) = replies[0]["sources"]
    assert source["rows"] == len(run_ids)
    assert source["last_run"]["status"] == "stored"
    served = await status_requests_per_instance(nats_url, bus_prefix, instances=2)
    assert sum(served) == len(replies)
    assert min(served) >= 1, f"one replica answered every request: {served}"


async def status_requests_per_instance(nats_url: str, prefix: str, *, instances: int) -> list[int]:
    """``status`` requests served by each instance of the service, from ``$SRV.STATS``."""
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=instances)
        await nc.publish(f"$SRV.STATS.{prefix}", b"", reply=inbox)
        served = []
        for _ in range(instances):
            stats = msgspec.json.decode((await sub.next_msg(timeout=5)).data)
            (status,) = [e for e in stats["endpoints"] if e["name"] == "status"]
            served.append(int(status["num_requests"]))
        return served
    finally:
        await nc.close()


# --- 5. more deliveries than JetStream's max_deliver ----------------------------------------


async def test_a_run_retried_more_than_max_deliver_times_is_still_recorded_as_failed(
    api: LocalAPI,
    make_settings: MakeSettings,
    nats_url: str,
    bus_prefix: str,
    database_url: str,
    db_schema: str,
) -> None:
    """Every nak counts as a delivery. JetStream used to drop a command after 50 of them
    (``max_deliver``), silently: the run stayed ``fetching`` forever, never failed."""
    api.route("/down", status=503, body="maintenance", content_type="text/plain")
    attempts = 60
    settings = make_settings(
        [
            {
                "name": "down",
                "url": api.url("/down"),
                "schedule": "0 0 1 1 *",
                "retries": {"max_attempts": attempts, "max_backoff_s": 0.001},
            }
        ]
    )
    async with open_daemon(settings):
        (run_id,) = await trigger(nats_url, bus_prefix, 1, source="down")
        runs = await wait_runs(
            database_url,
            db_schema,
            lambda runs: runs.status.get(run_id) == "failed",
            what=f"the run failed after {attempts} attempts",
        )
        await eventually(lambda: bus_settled(nats_url, bus_prefix), what="the bus settled")
    assert runs.attempts[run_id] == attempts
    assert len(api.hits("/down")) == attempts
    assert runs.total_rows == 0


# --- 6. runs of one source, held back -------------------------------------------------------


async def test_two_replicas_never_overlap_runs_of_one_source(
    api: LocalAPI,
    make_settings: MakeSettings,
    nats_url: str,
    bus_prefix: str,
    database_url: str,
    db_schema: str,
) -> None:
    """``allow_overlap = false`` holds across replicas, not only within one process."""
    api.route("/one", json={"one": True}, delay_s=1.5)
    # One fetch slot each: the replica busy with the first run does not take the second.
    settings = make_settings(
        [source(api, "one", "/one")],
        max_concurrent_fetches=1,
    )
    async with open_daemon(settings), open_daemon(settings):
        (first,) = await trigger(nats_url, bus_prefix, 1, source="one")
        await wait_for(lambda: len(api.hits("/one")) == 1, what="the first run in flight")
        (second,) = await trigger(nats_url, bus_prefix, 1, source="one")
        await wait_runs(database_url, db_schema, stored([first, second]), what="both stored")
    async with connect_db(database_url, db_schema) as conn:
        cur = await conn.execute(
            "SELECT b.started_at < a.finished_at FROM collection_runs a, collection_runs b"
            " WHERE a.run_id = %s AND b.run_id = %s",
            (first, second),
        )
        overlapped = await cur.fetchone()
    assert overlapped == (False,), "the second run started before the first had finished"


async def test_a_run_held_back_by_overlap_keeps_its_retries(
    api: LocalAPI,
    make_settings: MakeSettings,
    nats_url: str,
    bus_prefix: str,
    database_url: str,
    db_schema: str,
) -> None:
    """Waiting for the source's previous run is not an attempt: the retry budget is intact."""
    api.route("/busy", json={"first": True}, delay_s=2.5, times=1)  # the first run: slow
    api.route("/busy", status=503, body="busy", content_type="text/plain", times=1)
    api.route("/busy", json={"second": True})  # the second run's retry succeeds
    settings = make_settings(
        [
            {
                "name": "busy",
                "url": api.url("/busy"),
                "schedule": "0 0 1 1 *",
                "retries": {"max_attempts": 3, "max_backoff_s": 0.1},
            }
        ]
    )
    async with open_daemon(settings):
        await trigger(nats_url, bus_prefix, 1, source="busy")
        await wait_for(lambda: len(api.hits("/busy")) == 1, what="the first run in flight")
        (second,) = await trigger(nats_url, bus_prefix, 1, source="busy")
        runs = await wait_runs(
            database_url,
            db_schema,
            lambda runs: runs.status.get(second) in ("stored", "failed"),
            what="the second run settled",
        )
    # The second run waited about 2.5 s for the first, then met one 503: with 3 attempts
    # allowed it is retried and stored, after 2 real attempts.
    assert runs.status[second] == "stored"
    assert runs.attempts[second] == 2
