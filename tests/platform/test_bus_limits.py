"""Streams, buckets and the object store follow the settings, or the daemon says why not.

``create_key_value`` on an existing bucket changes nothing (STACK-NOTES): raising
``stream_replicas`` from 1 to 3 on a cluster used to update the streams and leave the buckets
and the object store on one node, so losing that node stalled every run.
"""

from __future__ import annotations

import nats
import pytest

from contracts import Subjects
from daemon.app import open_daemon
from daemon.errors import FatalError
from tests.fix_cluster import Cluster
from tests.fix_daemon import MakeSettings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


async def stream_configs(url: str, prefix: str) -> dict[str, tuple[int, float]]:
    """``(replicas, max age in s)`` of every stream and bucket the pipeline needs."""
    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream()
        out = {}
        for name in Subjects(prefix).streams:
            config = (await js.stream_info(name)).config
            out[name] = (int(config.num_replicas or 1), float(config.max_age or 0))
        return out
    finally:
        await nc.close()


async def test_raising_stream_replicas_moves_every_stream_and_bucket_to_three_nodes(
    nats_cluster: Cluster, make_settings: MakeSettings, bus_prefix: str
) -> None:
    await nats_cluster.wait_ready()
    one = make_settings([], nats_url=nats_cluster.url, stream_replicas=1)
    async with open_daemon(one):
        pass
    before = await stream_configs(nats_cluster.url, bus_prefix)
    assert {replicas for replicas, _ in before.values()} == {1}
    three = make_settings([], nats_url=nats_cluster.url, stream_replicas=3)
    async with open_daemon(three):
        pass
    after = await stream_configs(nats_cluster.url, bus_prefix)
    assert {name: replicas for name, (replicas, _) in after.items()} == dict.fromkeys(after, 3)


async def test_a_new_stream_max_age_reaches_the_buckets_and_the_object_store(
    make_settings: MakeSettings, nats_url: str, bus_prefix: str
) -> None:
    s = Subjects(bus_prefix)
    async with open_daemon(make_settings([], stream_max_age_s=3600, duplicate_window_s=600)):
        pass
    async with open_daemon(make_settings([], stream_max_age_s=7200, duplicate_window_s=600)):
        pass
    ages = {name: age for name, (_, age) in (await stream_configs(nats_url, bus_prefix)).items()}
    assert ages[f"KV_{s.progress_bucket}"] == 7200
    assert ages[f"OBJ_{s.bodies_bucket}"] == 7200
    assert ages[s.raw_stream] == 7200
    assert ages[f"KV_{s.sources_bucket}"] == 0  # kept forever, whatever the streams' age


async def test_a_storage_jetstream_cannot_change_is_a_clear_fatal_error(
    make_settings: MakeSettings, bus_prefix: str
) -> None:
    async with open_daemon(make_settings([], stream_storage="file")):
        pass
    with pytest.raises(FatalError) as caught:
        async with open_daemon(make_settings([], stream_storage="memory")):
            pass
    message = str(caught.value)
    assert message.startswith("stream_storage: ")
    assert Subjects(bus_prefix).collect_stream in message
    assert "kept in file storage, not memory" in message
