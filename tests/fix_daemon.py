"""Run the real daemon in-process against the test's NATS, PostgreSQL and local API.

``make_settings(sources=[...])`` gives Settings bound to this test's bus prefix and schema;
``request(subject, body)`` talks to the service like ``nats req`` does; ``wait_for`` polls
PostgreSQL until what a user would see is there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from daemon.settings import Settings, parse_settings


class MakeSettings(Protocol):
    def __call__(
        self, sources: list[dict[str, Any]] | None = None, **overrides: Any
    ) -> Settings: ...


@pytest.fixture
def make_settings(
    nats_url: str, database_url: str, bus_prefix: str, db_schema: str, tmp_path: Path
) -> MakeSettings:
    def build(sources: list[dict[str, Any]] | None = None, **overrides: Any) -> Settings:
        data: dict[str, Any] = {
            "sources": sources or [],
            "nats_url": nats_url,
            "database_url": database_url,
            "bus_prefix": bus_prefix,
            "database_schema": db_schema,
            "state_dir": str(tmp_path / "state"),
            "shutdown_grace_s": 5,
        }
        data.update(overrides)
        return parse_settings(data, "test")

    return build


Requester = Callable[..., Awaitable[Msg]]


@pytest.fixture
def request_reply(nats_url: str, bus_prefix: str) -> Requester:
    """``await request_reply("status", b"")`` → the reply message of ``<prefix>.status``."""

    async def call(endpoint: str, body: bytes | dict[str, Any] = b"", wait_s: float = 5.0) -> Msg:
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        nc = await nats.connect(nats_url)
        try:
            return await nc.request(f"{bus_prefix}.{endpoint}", data, timeout=wait_s)
        finally:
            await nc.close()

    return call


async def wait_for(
    check: Callable[[], Any], *, within_s: float = 15.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``within_s``."""
    last: Any = None
    with anyio.move_on_after(within_s):
        while True:
            last = check()
            if last:
                return last
            await anyio.sleep(interval)
    raise AssertionError(f"timed out after {within_s} s waiting for {what or check}: last={last!r}")
