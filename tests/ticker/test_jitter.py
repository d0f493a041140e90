"""``jitter_s``: sources sharing a schedule fire at fixed, name-derived offsets after the slot."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest

from daemon.app import open_daemon
from daemon.platform.clock import ManualClock
from daemon.settings import SourceConfig
from daemon.ticker import jitter_offset
from tests.fix_daemon import MakeSettings, wait_for
from tests.fix_http import LocalAPI

SLOT = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


def config(name: str, jitter_s: float) -> SourceConfig:
    return SourceConfig(name=name, url="http://x", schedule="0 6 * * *", jitter_s=jitter_s)


def test_the_offset_is_fixed_by_the_name_and_within_the_jitter() -> None:
    offsets = {name: jitter_offset(config(name, 600)) for name in ("a", "b", "rates", "weather")}
    assert all(timedelta(0) <= offset < timedelta(seconds=600) for offset in offsets.values())
    assert len(set(offsets.values())) == 4
    # Stable across processes and releases: sha256 of the name, not Python's salted hash().
    assert jitter_offset(config("rates", 600)) == offsets["rates"]
    fraction = int.from_bytes(hashlib.sha256(b"rates").digest()[:8], "big") / 2**64
    assert offsets["rates"] == timedelta(seconds=600 * fraction)
    assert jitter_offset(config("rates", 0)) == timedelta(0)


def run_ids(db: psycopg.Connection[Any]) -> list[tuple[str, datetime, str]]:
    return db.execute(
        "SELECT run_id, scheduled_for, status FROM collection_runs ORDER BY run_id"
    ).fetchall()


@pytest.mark.anyio
async def test_sources_sharing_a_schedule_fire_at_their_offsets_with_the_slot_as_run_id(
    api: LocalAPI, make_settings: MakeSettings, db_conn: psycopg.Connection[Any]
) -> None:
    api.route("/a", json={"a": 1})
    api.route("/b", json={"b": 1})
    sources = [
        {"name": name, "url": api.url(f"/{name}"), "schedule": "0 6 * * *", "jitter_s": 600}
        for name in ("a", "b")
    ]
    settings = make_settings(sources)
    first, second = sorted(settings.sources, key=jitter_offset)
    early, late = jitter_offset(first), jitter_offset(second)
    assert timedelta(seconds=1) < early < late - timedelta(seconds=1)

    clock = ManualClock(SLOT - timedelta(seconds=1))
    async with open_daemon(settings, clock=clock):
        clock.set(SLOT)
        await anyio.sleep(0.3)
        assert run_ids(db_conn) == []  # the slot has come, neither offset yet
        clock.set(SLOT + early)
        await wait_for(lambda: len(run_ids(db_conn)) == 1 and run_ids(db_conn)[0][2] == "stored")
        assert not api.hits(f"/{second.name}")
        clock.set(SLOT + late - timedelta(seconds=1))
        await anyio.sleep(0.3)
        assert len(run_ids(db_conn)) == 1
        clock.set(SLOT + late)
        await wait_for(lambda: [row[2] for row in run_ids(db_conn)] == ["stored", "stored"])

    # The run is for the slot itself: same run id and scheduled_for as without jitter.
    assert run_ids(db_conn) == [
        ("a@20261128T060000Z", SLOT, "stored"),
        ("b@20261128T060000Z", SLOT, "stored"),
    ]
