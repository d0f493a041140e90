"""A real 3-node JetStream cluster, made from the shipped ``ops/nats/cluster-{1,2,3}.conf``.

Each node's conf is the operator's file with hosts and ports replaced by free ports of
127.0.0.1 and its store moved under the test's temporary directory, so what is tested is what
ships. A test may stop a node and start it again on the same ports and store.
"""

from __future__ import annotations

import functools
import re
import signal
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import nats
import nats.errors
import pytest
from nats.js.api import ClusterInfo

from tests import ROOT
from tests.fix_faults import NATS_SERVER, eventually, free_port

OPS = ROOT / "ops" / "nats"
START_TIMEOUT_S = 20.0


@dataclass
class ClusterNode:
    name: str
    conf: Path
    port: int
    log: Path
    #: The monitoring port (``http:`` in the conf): ``/jsz`` names the meta leader.
    monitor_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None, f"{self.name} is running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(NATS_SERVER), "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Cluster:
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """All three seeds, as coleta's ``nats_url`` takes them."""
        return ",".join(node.url for node in self.nodes)

    @property
    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.process is not None]

    @property
    def live_url(self) -> str:
        """The seeds of the nodes running now, for a client that must not wait on a dead one."""
        return ",".join(node.url for node in self.running)

    def node(self, name: str) -> ClusterNode:
        (node,) = [node for node in self.nodes if node.name == name]
        return node

    async def meta_leader(self) -> str:
        """The server name of the JetStream meta leader, from a running node's ``/jsz``."""
        node = self.running[0]
        async with httpx.AsyncClient(timeout=5) as client:
            reply = await client.get(f"http://127.0.0.1:{node.monitor_port}/jsz")
        reply.raise_for_status()
        leader: str = reply.json()["meta_cluster"]["leader"]
        return leader

    async def wait_ready(self, within_s: float = START_TIMEOUT_S) -> None:
        """Until JetStream has a meta leader and answers on every running node."""
        for node in self.nodes:
            if node.process is not None:
                await eventually(
                    functools.partial(_jetstream_answers, node.url),
                    within_s=within_s,
                    what=f"JetStream on {node.name}",
                )

    async def start(self, node: ClusterNode) -> None:
        await anyio.to_thread.run_sync(node.start)
        await self.wait_ready()

    async def stop(self, node: ClusterNode, sig: signal.Signals = signal.SIGKILL) -> None:
        await anyio.to_thread.run_sync(node.stop, sig)


@dataclass(frozen=True)
class Placement:
    """Where JetStream keeps one stream or consumer: its configured replicas, the leader, and
    whether each follower is current (``$JS.API.STREAM.INFO`` / ``CONSUMER.INFO``)."""

    replicas: int
    leader: str | None
    followers: dict[str, bool]

    @property
    def peers(self) -> set[str]:
        return {*self.followers, *([self.leader] if self.leader else [])}

    @property
    def whole(self) -> bool:
        """A leader and every configured replica, each follower current."""
        return (
            self.leader is not None
            and len(self.peers) == self.replicas
            and all(self.followers.values())
        )


def _placement(replicas: int | None, cluster: ClusterInfo | None) -> Placement:
    cluster = cluster or ClusterInfo()
    return Placement(
        replicas=int(replicas or 1),
        leader=cluster.leader,
        followers={
            str(peer.name): bool(peer.current and not peer.offline)
            for peer in cluster.replicas or []
        },
    )


async def placements(
    url: str, streams: Iterable[str], consumers: Iterable[tuple[str, str]] = ()
) -> dict[str, Placement]:
    """The placement of each stream (by name) and consumer (``stream/consumer``), as an
    independent client sees it."""
    nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream(timeout=5)
        found = {}
        for name in streams:
            info = await js.stream_info(name)
            found[name] = _placement(info.config.num_replicas, info.cluster)
        for stream, consumer in consumers:
            cinfo = await js.consumer_info(stream, consumer)
            # A consumer's replicas default to its stream's (num_replicas 0 in its config).
            stream_info = await js.stream_info(stream)
            replicas = cinfo.config.num_replicas or stream_info.config.num_replicas
            found[f"{stream}/{consumer}"] = _placement(replicas, cinfo.cluster)
        return found
    finally:
        await nc.close()


async def _jetstream_answers(url: str) -> bool:
    try:
        nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0)
    except (nats.errors.Error, OSError, TimeoutError):
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except (nats.errors.Error, TimeoutError):
        return False
    finally:
        await nc.close()


def node_conf(text: str, *, ports: dict[str, tuple[int, int, int]], store: Path) -> str:
    """An ``ops/nats/cluster-N.conf`` with its hosts and ports made local."""
    name = re.search(r"^server_name:\s*(\S+)", text, re.M)
    assert name is not None, "the shipped conf names its server"
    client, route, http = ports[name[1]]
    text = text.replace("0.0.0.0:4222", f"127.0.0.1:{client}")
    text = text.replace("0.0.0.0:6222", f"127.0.0.1:{route}")
    text = text.replace("0.0.0.0:8222", f"127.0.0.1:{http}")
    for host, (_, other_route, _) in ports.items():
        text = text.replace(f"nats-route://{host}:6222", f"nats-route://127.0.0.1:{other_route}")
    text = re.sub(r"store_dir:\s*\S+", f"store_dir: {store}", text)
    # Small stores: the tests keep little, and several clusters may run on one machine.
    text = re.sub(r"max_file_store:\s*\S+", "max_file_store: 1GB", text)
    return re.sub(r"max_memory_store:\s*\S+", "max_memory_store: 256MB", text)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three nats-servers from ``ops/nats``, clustered, with JetStream on disk."""
    names = ("nats-1", "nats-2", "nats-3")
    ports = {name: (free_port(), free_port(), free_port()) for name in names}
    cluster = Cluster()
    for i, name in enumerate(names, start=1):
        text = (OPS / f"cluster-{i}.conf").read_text()
        conf = tmp_path / f"{name}.conf"
        conf.write_text(node_conf(text, ports=ports, store=tmp_path / name))
        client, _, monitor = ports[name]
        cluster.nodes.append(
            ClusterNode(name, conf, client, tmp_path / f"{name}.log", monitor_port=monitor)
        )
    for node in cluster.nodes:
        node.start()
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop(signal.SIGTERM)
