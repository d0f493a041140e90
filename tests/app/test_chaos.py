"""A minute of hostile answers: the daemon never restarts, every run ends, every row is whole.

The daemon runs as a process of its own (``python -m daemon run``) against the hostile API of
``fix_hostile``, which answers each request at random with one of ~25 behaviours: good JSON,
numbers no float holds, JSON nested 1,000 to 100,000 deep, JSON lines, binary, Latin-1 and
UTF-16 text, 1.5 MB bodies, bodies that lie about their Content-Encoding, 5 MB error pages,
429s and 503s, redirect loops and invalid redirects, resets mid-body, bodies shorter than
their Content-Length, bytes that are not HTTP, slow answers and 60 KB of headers.

Sources tick every 2 seconds and are also triggered by hand. After ``COLETA_CHAOS_S`` seconds
(default 60) a reload disables the schedules; then every run must reach a final status,
every stored row must be exactly one complete body the API served, every failed run must
have its command in the dead-letter stream, and SIGTERM must stop the daemon with exit 0.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest

from contracts import DeadLetter, Subjects
from tests.fix_faults import DaemonFactory, connect_db, eventually, request_json
from tests.fix_hostile import TOKEN_RE, HostileAPI

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(600)]

CHAOS_S = float(os.environ.get("COLETA_CHAOS_S", "60"))
FINAL = ("stored", "unchanged", "failed", "missed")
ONE_PAGE = [f"one{i}" for i in range(6)]


def config(
    api: HostileAPI,
    prefix: str,
    schema: str,
    state: Path,
    nats_url: str,
    db_url: str,
    *,
    enabled: bool,
) -> str:
    common = {
        "schedule": "*/2 * * * * *",
        "enabled": enabled,
        "timeout_s": 2,
        "connect_timeout_s": 2,
        "total_timeout_s": 6,
        "max_response_bytes": 3_000_000,
        "retries": {"max_attempts": 3, "max_backoff_s": 0.5},
        "conditional": False,
    }
    sources = [{"name": name, "url": api.url(f"/one/{name}"), **common} for name in ONE_PAGE]
    sources.append(
        {
            "name": "paged",
            "url": api.url("/paged"),
            **common,
            "records_path": "items",
            "pagination": {"kind": "page", "has_more_path": "has_more", "max_pages": 5},
        }
    )
    lines = [
        f'nats_url = "{nats_url}"',
        f'database_url = "{db_url}"',
        f'bus_prefix = "{prefix}"',
        f'database_schema = "{schema}"',
        f'state_dir = "{state}"',
        "ack_wait_s = 5",
        "shutdown_grace_s = 3",
        "max_concurrent_fetches = 8",
    ]
    for source in sources:
        lines.append("[[sources]]")
        lines += [f"{k} = {_toml(v)}" for k, v in source.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A TOML value (inline tables for dicts)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return msgspec.json.encode(value).decode()


async def whole(conn: Any, row: tuple[Any, ...], api: HostileAPI) -> str:
    """The kind of served body a stored row is, exactly; fails if it is not one whole body.

    A ``data`` row is compared with what was served by PostgreSQL itself (``jsonb`` equality:
    the same document, numbers included, whatever the spacing).
    """
    row_id, data_text, body = row
    if data_text is not None:
        match = TOKEN_RE.search(data_text.encode())
        assert match is not None, f"a stored JSON row without a token: {data_text[:200]}"
        served = api.served[match[1].decode()]
        sent = served.body.decode("utf-16" if "utf-16" in served.content_type else "utf-8")
        cur = await conn.execute(
            "SELECT data = %s::jsonb FROM collected_data WHERE id = %s", (sent, row_id)
        )
        assert await cur.fetchone() == (True,), f"{served.kind} stored differently"
        return served.kind
    body = bytes(body)
    if not body:
        assert api.answered["empty"], "an empty row, but the API never answered empty"
        return "empty"
    match = TOKEN_RE.search(body) or TOKEN_RE.search(body.decode("utf-16", "ignore").encode())
    assert match is not None, f"a stored body without a token: {body[:200]!r}"
    served = api.served[match[1].decode()]
    assert body == served.body, f"{served.kind}: stored {len(body)} bytes of {len(served.body)}"
    return served.kind


async def test_a_minute_of_hostile_answers(
    hostile_api: HostileAPI,
    daemon_processes: DaemonFactory,
    nats_url: str,
    database_url: str,
    db_schema: str,
    bus_prefix: str,
    tmp_path: Path,
) -> None:
    def text(enabled: bool) -> str:
        return config(
            hostile_api,
            bus_prefix,
            db_schema,
            tmp_path / "state",
            nats_url,
            database_url,
            enabled=enabled,
        )

    daemon = daemon_processes("chaos", text(True))
    daemon.start()
    await daemon.wait_ready()
    assert daemon.process is not None
    pid = daemon.process.pid
    triggered = 0
    # A deadline checked between requests, not a cancel scope: a request cut off half-way
    # would leave its NATS connection open.
    deadline = anyio.current_time() + CHAOS_S
    while anyio.current_time() < deadline:
        assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.tail()}"
        for name in (*ONE_PAGE[:2], "paged"):
            await request_json(nats_url, f"{bus_prefix}.trigger", name.encode())
            triggered += 1
        await anyio.sleep(0.5)
    # No more schedules: everything queued so far must end.
    daemon.config.write_text(text(False))
    daemon.process.send_signal(signal.SIGHUP)

    async def statuses() -> Counter[str]:
        async with connect_db(database_url, db_schema) as conn:
            cur = await conn.execute("SELECT status, count(*) FROM collection_runs GROUP BY 1")
            return Counter({status: n for status, n in await cur.fetchall()})

    counts = await eventually(
        statuses,
        until=lambda c: set(c) <= set(FINAL),
        within_s=120,
        what="every run in a final status",
    )
    assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.tail()}"
    assert daemon.process.pid == pid
    assert daemon.starts == 1
    assert daemon.events("fetch.crashed") == [] or all(
        e.get("error_code") for e in daemon.events("fetch.crashed")
    )

    async with connect_db(database_url, db_schema) as conn:
        cur = await conn.execute("SELECT id, data::text, body FROM collected_data")
        rows = await cur.fetchall()
        kinds = Counter([await whole(conn, row, hostile_api) for row in rows])
        cur = await conn.execute(
            "SELECT r.run_id, r.pages, count(DISTINCT d.page) FROM collection_runs r"
            " JOIN collected_data d USING (run_id) WHERE r.status = 'stored' GROUP BY 1, 2"
        )
        pages = await cur.fetchall()
        cur = await conn.execute("SELECT run_id FROM collection_runs WHERE status = 'failed'")
        failed = {run_id for (run_id,) in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT error_code, count(*) FROM collection_runs WHERE status = 'failed' GROUP BY 1"
        )
        codes = dict(await cur.fetchall())
    assert all(stored_pages == distinct for _, stored_pages, distinct in pages), pages

    letters = await _dead_letters(nats_url, bus_prefix)
    lettered = {letter.run_id for letter in letters if letter.run_id}
    assert failed <= lettered, f"failed runs without a dead letter: {sorted(failed - lettered)}"

    assert daemon.kill(signal.SIGTERM) == 0
    summary = {
        "seconds": CHAOS_S,
        "answers": dict(hostile_api.answered),
        "runs": dict(counts),
        "triggered": triggered,
        "rows": len(rows),
        "rows_by_kind": dict(kinds),
        "failed_by_code": codes,
        "dead_letters": len(letters),
    }
    (tmp_path / "chaos-summary.json").write_text(json.dumps(summary, indent=2))
    print("chaos summary:", json.dumps(summary, sort_keys=True))
    assert counts["stored"] > 0
    assert counts["failed"] > 0


async def _dead_letters(nats_url: str, prefix: str) -> list[DeadLetter]:
    s = Subjects(prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(s.dlq_stream)
        out = []
        for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
            raw = await js.get_msg(s.dlq_stream, seq)
            out.append(msgspec.json.decode(raw.data or b"", type=DeadLetter))
        return out
    finally:
        await nc.close()
