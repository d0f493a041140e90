"""A 3-node JetStream cluster loses a node in the middle of runs: nothing lost, nothing doubled.

The cluster is three real nats-servers from the shipped ``ops/nats/cluster-{1,2,3}.conf``
(``fix_cluster``), the daemon a process of its own given all three seeds. Thirty-two sources
are triggered at once (one-page ones, paginated ones whose progress lives in a KV bucket, and
bodies too large for one message, which go through the object store) against a local API slow
enough that runs are in flight when a node is SIGKILLed: the leader of the raw stream, or the
JetStream meta leader. Every run must be stored while that node is still down, each page once,
and the cluster must heal when it comes back.

The same must hold after a deployment raised ``stream_replicas`` from 1 to 3: every stream,
bucket, object store and durable consumer is then kept on three nodes, and losing the node
that held the single replica before stalls nothing.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest

from contracts import Subjects
from tests.fix_cluster import Cluster, ClusterNode, Placement, placements
from tests.fix_faults import (
    DaemonFactory,
    DaemonProcess,
    connect_db,
    eventually,
    read_runs,
    wait_runs,
)
from tests.fix_http import LocalAPI

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

#: Sources by kind: how many, and the pages each run of them stores.
ONE_PAGE, PAGED, LARGE, LATE = 20, 6, 2, 4
PAGES = 3
#: Over NATS's 1 MiB max_payload: the body goes through the object store.
LARGE_BYTES = 1_100_000
#: Short, so a delivery held by a connection that died is redelivered within the test.
ACK_WAIT_S = 3
#: Runs stored before the node is killed; the rest are queued or in flight.
KILL_AFTER_STORED = 6
FINISH_WITHIN_S = 60.0
#: How long a trigger may take to be answered: a stream's leader election included.
TRIGGER_S = 20.0


def pages_of(name: str) -> int:
    return PAGES if name.startswith("paged") else 1


def sources(api: LocalAPI) -> list[dict[str, Any]]:
    """The sources, their API routes added: every page names its source and its number."""
    out: list[dict[str, Any]] = []
    common = {"schedule": "0 0 1 1 *", "retries": {"max_attempts": 5, "max_backoff_s": 0.5}}
    for i in range(ONE_PAGE + LATE):
        name = f"one{i:02d}" if i < ONE_PAGE else f"late{i - ONE_PAGE}"
        # An ETag: a source state to keep (a source without validators or cursor has none).
        etag = {"ETag": f'"{name}-1"'}
        api.route(f"/{name}", json={"source": name, "page": 1}, headers=etag, delay_s=0.6)
        out.append({"name": name, "url": api.url(f"/{name}"), **common})
    for i in range(PAGED):
        name = f"paged{i}"
        for page in range(1, PAGES + 1):
            nxt = f"/{name}/{page + 1}" if page < PAGES else None
            api.route(
                f"/{name}/{page}",
                json={"source": name, "page": page, "items": [page], "next": nxt},
                delay_s=0.4,
            )
        pagination = {"kind": "next_url", "next_url_path": "next", "records_path": "items"}
        out.append({"name": name, "url": api.url(f"/{name}/1"), "pagination": pagination, **common})
    for i in range(LARGE):
        name = f"large{i}"
        blob = "x" * LARGE_BYTES
        api.route(f"/{name}", json={"source": name, "page": 1, "blob": blob}, delay_s=0.5)
        out.append({"name": name, "url": api.url(f"/{name}"), **common})
    return out


def config(
    cluster: Cluster, database_url: str, prefix: str, schema: str, state: Path, **top: Any
) -> str:
    """A config file for ``coleta run`` on the cluster; ``top`` sets top-level keys."""
    settings = {
        "nats_url": cluster.url,
        "database_url": database_url,
        "bus_prefix": prefix,
        "database_schema": schema,
        "state_dir": str(state),
        "ack_wait_s": ACK_WAIT_S,
        "shutdown_grace_s": 3,
        "max_concurrent_fetches": 4,
        **top,
    }
    return "\n".join(f"{key} = {_toml(value)}" for key, value in settings.items()) + "\n"


def with_sources(text: str, items: Iterable[dict[str, Any]]) -> str:
    for item in items:
        text += "[[sources]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in item.items())
    return text


def _toml(value: Any) -> str:
    """A TOML value (inline tables for dicts)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return msgspec.json.encode(value).decode()


# --- talking to the cluster -----------------------------------------------------------------


async def trigger(cluster: Cluster, prefix: str, names: Iterable[str]) -> dict[str, str]:
    """Trigger one run of each source through whichever node is up; source by run id.

    While a node fails over, queueing a run waits for the stream's new leader: the request
    waits long enough not to give up on a run that is queued after all. Asked again only when
    nothing was queued: no daemon answered, or it answered ``unavailable``.
    """
    run_ids = {}
    nc = await nats.connect(cluster.live_url.split(","), connect_timeout=2)
    try:
        for name in names:

            async def ask(name: str = name) -> str | None:
                try:
                    reply = await nc.request(f"{prefix}.trigger", name.encode(), timeout=TRIGGER_S)
                except nats.errors.NoRespondersError:
                    return None
                if (reply.headers or {}).get("Nats-Service-Error-Code") == "503":
                    return None
                run_id: str = msgspec.json.decode(reply.data)["run_id"]
                return run_id

            queued = await eventually(ask, within_s=30, what=f"a trigger of {name}")
            assert queued is not None
            run_ids[queued] = name
    finally:
        await nc.close()
    return run_ids


def pipeline(prefix: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The streams (buckets and object store included) and durable consumers coleta uses."""
    s = Subjects(prefix)
    consumers = [
        (s.collect_stream, s.fetcher_consumer),
        (s.collect_stream, s.runs_consumer),
        (s.raw_stream, s.writer_consumer),
    ]
    return list(s.streams), consumers


async def pipeline_placements(cluster: Cluster, prefix: str) -> dict[str, Placement]:
    streams, consumers = pipeline(prefix)
    return await placements(cluster.live_url, streams, consumers)


async def on_three_replicas(cluster: Cluster, prefix: str) -> bool:
    """Every stream and consumer of the pipeline on three replicas, each current (False while
    JetStream does not answer, as during an election)."""
    try:
        found = await pipeline_placements(cluster, prefix)
    except (nats.errors.Error, TimeoutError):
        return False
    return all(p.replicas == 3 and p.whole for p in found.values())


async def bus_settled(cluster: Cluster, prefix: str) -> bool:
    """Every durable consumer has delivered everything and had it acknowledged."""
    nc = await nats.connect(cluster.live_url.split(","), connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        for stream, consumer in pipeline(prefix)[1]:
            info = await js.consumer_info(stream, consumer)
            if info.num_pending or info.num_ack_pending:
                return False
        return True
    except (nats.errors.Error, TimeoutError):
        return False
    finally:
        await nc.close()


# --- what PostgreSQL holds ------------------------------------------------------------------


async def assert_each_page_stored_once(
    database_url: str, schema: str, run_ids: dict[str, str]
) -> None:
    """Every run (``run_ids``: source by run id) ``stored``, none else recorded; each page of
    each run exactly one row, with the content its source served for that page."""
    async with connect_db(database_url, schema) as conn:
        cur = await conn.execute("SELECT run_id, source, status FROM collection_runs")
        runs = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT run_id, data->>'source', (data->>'page')::int, count(*)"
            " FROM collected_data GROUP BY 1, 2, 3"
        )
        content = {(row[0], row[1], row[2]): row[3] for row in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT run_id, page, record FROM collected_data"
            " GROUP BY run_id, page, record HAVING count(*) > 1"
        )
        doubled = await cur.fetchall()
    assert runs == {run_id: (name, "stored") for run_id, name in run_ids.items()}
    expected = {
        (run_id, name, page): 1
        for run_id, name in run_ids.items()
        for page in range(1, pages_of(name) + 1)
    }
    assert content == expected
    assert doubled == []


async def states_copied(cluster: Cluster, prefix: str, database_url: str, schema: str) -> bool:
    """The fetcher's copy of every source's state (``<prefix>_sources``) is PostgreSQL's
    ``source_state``: the next runs ask as the stored ones left them."""
    async with connect_db(database_url, schema) as conn:
        cur = await conn.execute(
            "SELECT source, etag, last_modified, body_sha256, cursor FROM source_state"
        )
        rows = await cur.fetchall()
    nc = await nats.connect(cluster.live_url.split(","), connect_timeout=2)
    try:
        kv = await nc.jetstream(timeout=5).key_value(Subjects(prefix).sources_bucket)
        for source, *state in rows:
            entry = await kv.get(source)
            copy = msgspec.json.decode(entry.value or b"{}")
            fields = ("etag", "last_modified", "body_sha256", "cursor")
            if [copy.get(field) for field in fields] != state:
                return False
        return bool(rows)
    except (nats.errors.Error, TimeoutError):  # a key not copied yet included
        return False
    finally:
        await nc.close()


# --- the scenario ---------------------------------------------------------------------------


async def lose_a_node_mid_run(
    cluster: Cluster,
    daemon: DaemonProcess,
    names: list[str],
    database_url: str,
    prefix: str,
    schema: str,
    victim: Callable[[], Awaitable[str]],
    earlier: dict[str, str] | None = None,
) -> ClusterNode:
    """Trigger every source but the late ones, SIGKILL the node ``victim()`` names once some
    runs are stored, trigger the late ones while it is down; every run (and the ``earlier``
    ones, already stored) must be stored, each page once, before it comes back. Returns the
    killed node, still down."""
    late = [name for name in names if name.startswith("late")]
    run_ids = await trigger(cluster, prefix, [n for n in names if n not in late])
    await wait_runs(
        database_url,
        schema,
        lambda runs: len(runs.stored() & set(run_ids)) >= KILL_AFTER_STORED,
        within_s=30,
        what=f"{KILL_AFTER_STORED} runs stored",
    )
    node = cluster.node(await victim())
    await cluster.stop(node, signal.SIGKILL)
    unfinished = set(run_ids) - (await read_runs(database_url, schema)).stored()
    assert unfinished, "every run was stored before the kill"
    run_ids |= earlier or {}

    run_ids |= await trigger(cluster, prefix, late)
    await wait_runs(
        database_url,
        schema,
        lambda runs: set(run_ids) <= runs.stored(),
        within_s=FINISH_WITHIN_S,
        what=f"every run stored with {node.name} down",
    )
    await eventually(lambda: bus_settled(cluster, prefix), what="the bus settled")
    await eventually(
        lambda: states_copied(cluster, prefix, database_url, schema),
        within_s=20,
        what="the fetcher's copy of the source states",
    )
    assert node.process is None, f"{node.name} came back before the runs finished"
    await assert_each_page_stored_once(database_url, schema, run_ids)
    assert daemon.process is not None
    assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.tail()}"
    return node


async def heals(cluster: Cluster, prefix: str, node: ClusterNode) -> None:
    """Start ``node`` again: every stream and consumer gets back all three replicas, current."""
    await cluster.start(node)
    await eventually(
        lambda: on_three_replicas(cluster, prefix),
        within_s=30,
        what=f"the cluster healed with {node.name} back",
    )


# --- 1. replicas 3 from the start -----------------------------------------------------------


@pytest.mark.parametrize("victim", ["raw-stream-leader", "meta-leader"])
async def test_a_node_killed_mid_run_loses_nothing_and_doubles_nothing(
    nats_cluster: Cluster,
    daemon_processes: DaemonFactory,
    api: LocalAPI,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    tmp_path: Path,
    victim: str,
) -> None:
    await nats_cluster.wait_ready()
    base = config(
        nats_cluster, database_url, bus_prefix, db_schema, tmp_path / "state", stream_replicas=3
    )
    items = sources(api)
    daemon = daemon_processes("daemon", with_sources(base, items))
    daemon.start()
    await daemon.wait_ready()
    found = await pipeline_placements(nats_cluster, bus_prefix)
    assert all(p.replicas == 3 for p in found.values()), found

    async def raw_leader() -> str:
        leader = (await pipeline_placements(nats_cluster, bus_prefix))[
            Subjects(bus_prefix).raw_stream
        ].leader
        assert leader is not None
        return leader

    pick = raw_leader if victim == "raw-stream-leader" else nats_cluster.meta_leader
    node = await lose_a_node_mid_run(
        nats_cluster,
        daemon,
        [item["name"] for item in items],
        database_url,
        bus_prefix,
        db_schema,
        pick,
    )
    await heals(nats_cluster, bus_prefix, node)


# --- 2. replicas raised from 1 to 3 ---------------------------------------------------------


async def test_after_raising_replicas_from_1_to_3_a_node_killed_mid_run_loses_nothing(
    nats_cluster: Cluster,
    daemon_processes: DaemonFactory,
    api: LocalAPI,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    tmp_path: Path,
) -> None:
    """A deployment that started on one replica and raised ``stream_replicas`` to 3."""
    await nats_cluster.wait_ready()
    items = sources(api)
    state = tmp_path / "state"
    one = daemon_processes(
        "r1",
        with_sources(
            config(nats_cluster, database_url, bus_prefix, db_schema, state, stream_replicas=1),
            [item for item in items if item["name"] in ("paged0", "large0")],
        ),
    )
    one.start()
    await one.wait_ready()
    # A paginated run and a large body: the progress bucket and the object store in use.
    first = await trigger(nats_cluster, bus_prefix, ["paged0", "large0"])
    await wait_runs(
        database_url,
        db_schema,
        lambda runs: set(first) <= runs.stored(),
        what="the first runs stored on one replica",
    )
    assert one.kill(signal.SIGTERM) == 0
    assert not one.events("daemon.grace_expired"), "an idle daemon waited out its grace"
    before = await pipeline_placements(nats_cluster, bus_prefix)
    assert {p.replicas for p in before.values()} == {1}, before
    # The node that held the most of the pipeline's single replicas (the raw stream's, on a
    # tie): the one whose loss stalled every run when buckets stayed on one replica.
    held = Counter(p.leader for p in before.values())
    raw = before[Subjects(bus_prefix).raw_stream].leader
    holder = max(held, key=lambda name: (held[name], name == raw))
    assert holder is not None

    three = daemon_processes(
        "r3",
        with_sources(
            config(nats_cluster, database_url, bus_prefix, db_schema, state, stream_replicas=3),
            items,
        ),
    )
    three.start()
    await three.wait_ready()
    # An independent client sees every stream, bucket, object store and durable consumer on
    # three nodes, the new replicas caught up.
    await eventually(
        lambda: on_three_replicas(nats_cluster, bus_prefix),
        within_s=30,
        what="every stream and consumer on three current replicas",
    )
    node = await lose_a_node_mid_run(
        nats_cluster,
        three,
        [item["name"] for item in items],
        database_url,
        bus_prefix,
        db_schema,
        _named(holder),
        earlier=first,
    )
    await heals(nats_cluster, bus_prefix, node)


def _named(name: str) -> Callable[[], Awaitable[str]]:
    async def victim() -> str:
        return name

    return victim
