"""Property: whatever an API answers, the run ends and the daemon goes on.

Hypothesis generates HTTP answers — statuses, arbitrary headers (content types, charsets,
encodings that lie), and bodies of any bytes, sizes, nesting depths, numbers and text
encodings — which a local API sends to a running daemon, one run each, through fetch → raw
payload → write. Every run must end in a final status within a bound; a stored page must be
the body exactly (bytes, or JSON-equal when it went to ``jsonb``); and the daemon must still
answer afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._collect import run_row
from tests._rawserver import RawServer
from tests.fix_faults import DaemonFactory

pytestmark = [pytest.mark.timeout(600)]

FINAL = ("stored", "unchanged", "failed")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class ScriptedAPI:
    """A raw HTTP/1.1 server answering every request with the current ``Answer``."""

    def __init__(self) -> None:
        self.answer = Answer(200, (), b"{}")
        self._raw = RawServer(self._client, name="scripted-api")

    def url(self, path: str) -> str:
        return self._raw.url(path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answer = self.answer
                head = [f"HTTP/1.1 {answer.status} X", f"Content-Length: {len(answer.body)}"]
                head += [f"{name}: {value}" for name, value in answer.headers]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> ScriptedAPI:
        self._raw.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._raw.stop()


# -- what an API may answer ----------------------------------------------------------------

_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**63, max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=30).map(str).map(msgspec.Raw),
)
_json_values = st.recursive(
    st.none() | st.booleans() | _numbers | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


def _encode_json(value: Any) -> bytes:
    return msgspec.json.encode(value)


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([10, 900, 1_000, 1_100, 5_000, 20_000, 150_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = b"1" if opener == b'{"a":' else b""
    return opener * depth + inner + closer * depth


#: Over 1 MiB: through the object store. Random bytes from a drawn seed, not st.binary: for a
#: size range Hypothesis draws a decision per byte (13 s of CPU per run of this test).
_large_bodies = st.builds(
    lambda size, seed: random.Random(seed).randbytes(size),
    st.integers(min_value=1_100_000, max_value=1_300_000),
    st.integers(min_value=0, max_value=2**64),
)
_bodies = st.one_of(
    st.binary(max_size=4096),
    _large_bodies,
    _json_values.map(_encode_json),
    deep_json(),
    st.text(max_size=300).map(lambda t: t.encode("utf-16")),
    st.text(max_size=300).map(lambda t: t.encode("latin-1", "replace")),
    st.lists(_json_values.map(_encode_json), max_size=5).map(b"\n".join),
    st.just(b""),
    st.just(b'{"n": 12345678901234567.89, "e": 1e400, "big": 1e999999}'),
)
_content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-16",
        "application/x-ndjson",
        "text/plain; charset=latin-1",
        "application/octet-stream",
        "text/html",
        "application/json; charset=nonsense",
        "\u00e9t\u00e9/bizarre",
    ]
)
_header_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    min_size=1,
    max_size=20,
).filter(lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection"))
_header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=200,
)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    status = draw(st.sampled_from([200, 200, 200, 201, 203, 204, 400, 404, 410, 429, 500, 503]))
    headers = list(draw(st.dictionaries(_header_names, _header_values, max_size=6)).items())
    headers = [
        (n, v)
        for n, v in headers
        if n.lower() not in ("content-type", "content-encoding", "retry-after", "location")
    ]
    if draw(st.booleans()):
        headers.append(("Content-Type", draw(_content_types)))
    if draw(st.integers(0, 4)) == 0:
        headers.append(
            (
                "Content-Encoding",
                draw(st.sampled_from(["gzip", "br", "deflate", "identity", "x-what"])),
            )
        )
    if status in (429, 503) and draw(st.booleans()):
        headers.append(("Retry-After", draw(st.sampled_from(["0", "1", "soon", "-5"]))))
    body = b"" if status == 204 else draw(_bodies)
    return Answer(status, tuple(headers), body)


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return msgspec.json.encode(value).decode()


def test_any_answer_ends_the_run_and_the_daemon_goes_on(
    daemon_processes: DaemonFactory,
    db_conn: Any,
    nats_url: str,
    database_url: str,
    db_schema: str,
    bus_prefix: str,
    tmp_path: Path,
) -> None:
    """The daemon runs as a process of its own: what it does cannot disturb the generation of
    examples here (OpenTelemetry's span ids come from the global ``random``)."""
    with ScriptedAPI() as api:
        retries = {"max_attempts": 2, "max_backoff_s": 0.05}
        common = {"schedule": "0 0 1 1 *", "retries": retries, "timeout_s": 3, "conditional": False}
        sources = [
            {"name": "page", "url": api.url("/p"), **common},
            {"name": "record", "url": api.url("/r"), "granularity": "record", **common},
        ]
        lines = [
            f'nats_url = "{nats_url}"',
            f'database_url = "{database_url}"',
            f'bus_prefix = "{bus_prefix}"',
            f'database_schema = "{db_schema}"',
            f'state_dir = "{tmp_path / "state"}"',
            "max_concurrent_fetches = 2",
        ]
        for source in sources:
            lines += ["[[sources]]", *(f"{k} = {_toml(v)}" for k, v in source.items())]
        daemon = daemon_processes("property", "\n".join(lines) + "\n")
        daemon.start()
        with start_blocking_portal("asyncio") as portal:
            portal.call(daemon.wait_ready)

            async def trigger(name: str) -> str:
                nc = await nats.connect(nats_url)
                try:
                    reply = await nc.request(f"{bus_prefix}.trigger", name.encode(), timeout=10)
                finally:
                    await nc.close()
                return str(msgspec.json.decode(reply.data)["run_id"])

            async def alive() -> bool:
                nc = await nats.connect(nats_url)
                try:
                    reply = await nc.request(f"{bus_prefix}.health", b"", timeout=10)
                finally:
                    await nc.close()
                return "status" in msgspec.json.decode(reply.data)

            seen: dict[str, int] = {}

            @given(answer=answers(), granularity=st.sampled_from(["page", "record"]))
            @settings(
                max_examples=int(os.environ.get("COLETA_PROPERTY_EXAMPLES", "60")),
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            def one_run(answer: Answer, granularity: str) -> None:
                api.answer = answer
                run_id = portal.call(trigger, granularity)
                row = _wait_final(db_conn, run_id)
                assert row is not None, f"run {run_id} never ended for {answer.status}"
                seen[row["status"]] = seen.get(row["status"], 0) + 1
                # Whatever a 2xx carries is stored as received (in ``body`` if need be).
                assert row["error_code"] != "store_rejected", row["error"]
                if row["status"] == "stored" and granularity == "page":
                    _assert_whole(db_conn, run_id, answer)
                assert portal.call(alive)
                assert daemon.process is not None
                assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.tail()}"

            one_run()
        assert daemon.starts == 1
    assert seen.get("stored"), seen
    assert seen.get("failed"), seen


def _wait_final(db_conn: Any, run_id: str, within_s: float = 40.0) -> dict[str, Any] | None:
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        row = run_row(db_conn, run_id)
        if row is not None and row["status"] in FINAL:
            return row
        time.sleep(0.02)
    return None


def _assert_whole(db_conn: Any, run_id: str, answer: Answer) -> None:
    rows = db_conn.execute(
        "SELECT data::text, body FROM collected_data WHERE run_id = %s", (run_id,)
    ).fetchall()
    assert len(rows) == 1, f"{len(rows)} rows for one page"
    data, body = rows[0]
    encoded = dict((n.lower(), v) for n, v in answer.headers).get("content-encoding", "identity")
    if encoded.lower() not in ("identity", "x-what"):
        return  # decoded by the client: what was stored is the decoded body
    if body is not None:
        assert bytes(body) == answer.body
    else:
        # jsonb equality, by PostgreSQL itself: the same document, numbers and depth included.
        same = db_conn.execute(
            "SELECT data = %s::jsonb FROM collected_data WHERE run_id = %s",
            (answer.body.decode(), run_id),
        ).fetchone()
        assert same == (True,), (data[:200], answer.body[:200])
