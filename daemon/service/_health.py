"""What ``coleta.health`` and ``coleta.status`` say of the daemon's dependencies.

The NATS connection, PostgreSQL, every JetStream stream the pipeline needs (``Subjects.streams``:
the work streams and the buckets' ``KV_…`` / ``OBJ_…`` streams) and every durable consumer
(``Subjects.consumers``), all checked at once, each within ``CHECK_TIMEOUT_S``, so an answer
never waits on checks in turn. Each is checked every time: one that went missing, even before
the service started, is named, never left out. Checks of this process's own
state (``watch``: its worker processes) are asked too, without waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from contracts import ComponentHealth
from daemon.platform.bus import Bus
from daemon.platform.db import Database

__all__ = ["CHECK_TIMEOUT_S", "Checks", "Dependencies", "consumer_check_name"]

#: Every check answers within this long; they run at once, so a reply waits about as long.
CHECK_TIMEOUT_S = 2.0

_CONNECTED = ComponentHealth(ok=True, detail="connected")
_NOT_CHECKED = ComponentHealth(ok=False, detail="not checked")


def consumer_check_name(stream: str, consumer: str) -> str:
    """A durable consumer's name among the checks: ``COLETA_COLLECT/fetcher``."""
    return f"{stream}/{consumer}"


@dataclass(slots=True)
class Checks:
    """The outcome of one round of checks."""

    bus: ComponentHealth = field(default_factory=lambda: _CONNECTED)
    database: ComponentHealth = field(default_factory=lambda: _NOT_CHECKED)
    #: Per stream name, then per ``stream/consumer``, in ``Subjects`` order; empty while
    #: NATS is not connected.
    streams: dict[str, ComponentHealth] = field(default_factory=dict)
    #: This process's own checks (``Dependencies.watch``), by name.
    local: dict[str, ComponentHealth] = field(default_factory=dict)

    def entries(self) -> dict[str, ComponentHealth]:
        """``bus``, ``database``, each stream and consumer, then the local checks: the health
        reply's ``checks``."""
        return {"bus": self.bus, "database": self.database, **self.streams, **self.local}

    def bus_summary(self) -> ComponentHealth:
        """The bus as one component (status): connected, and every stream answers."""
        failing = [f"{name}: {c.detail}" for name, c in self.streams.items() if not c.ok]
        if self.bus.ok and failing:
            return ComponentHealth(ok=False, detail="JetStream: " + "; ".join(failing))
        return self.bus


class Dependencies:
    """Checks the bus, the database, and the streams and consumers the bus declares."""

    def __init__(self, bus: Bus, db: Database) -> None:
        self._bus = bus
        self._db = db
        self._local: dict[str, Callable[[], ComponentHealth]] = {}

    def watch(self, name: str, check: Callable[[], ComponentHealth]) -> None:
        """Report ``check()`` as ``name`` in every health reply (it must not block)."""
        self._local[name] = check

    async def check(self) -> Checks:
        """The database and every stream and consumer at once, each within
        ``CHECK_TIMEOUT_S``."""
        checks = Checks()
        found: dict[str, ComponentHealth] = {}
        subjects = self._bus.subjects
        names = [*subjects.streams, *(consumer_check_name(*c) for c in subjects.consumers)]

        async def database() -> None:
            problem = await self._db.ping(CHECK_TIMEOUT_S)
            checks.database = ComponentHealth(ok=problem is None, detail=problem or "reachable")

        async def stream(name: str) -> None:
            problem = await self._bus.stream_problem(name, CHECK_TIMEOUT_S)
            found[name] = ComponentHealth(ok=problem is None, detail=problem or "ok")

        async def consumer(stream: str, durable: str) -> None:
            problem = await self._bus.consumer_problem(stream, durable, CHECK_TIMEOUT_S)
            found[consumer_check_name(stream, durable)] = ComponentHealth(
                ok=problem is None, detail=problem or "ok"
            )

        if not self._bus.connected:
            checks.bus = ComponentHealth(ok=False, detail="not connected to NATS")
        async with anyio.create_task_group() as tg:
            tg.start_soon(database, name="health-database")
            if checks.bus.ok:
                for name in subjects.streams:
                    tg.start_soon(stream, name, name=f"health-{name}")
                for stream_name, durable in subjects.consumers:
                    tg.start_soon(
                        consumer, stream_name, durable, name=f"health-{stream_name}-{durable}"
                    )
        checks.streams = {name: found[name] for name in names if name in found}
        checks.local = {name: check() for name, check in self._local.items()}
        return checks
