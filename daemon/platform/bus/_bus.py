"""The bus: a connection to NATS with coleta's streams declared, and the pull consumers'
fetch.

Known nats-py behaviour handled here: an empty fetch raises either
``nats.errors.TimeoutError`` or a bare ``TimeoutError``; ``drain()`` blocks after a timed-out
fetch, so pull subscriptions are unsubscribed and the connection closed, not drained.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import nats.errors
import nats.js.errors
from nats.aio.subscription import Subscription

from contracts import Subjects
from daemon.errors import from_nats, nats_errors
from daemon.platform.bus._connect import connect_nats
from daemon.platform.bus._declare import BusOptions
from daemon.platform.bus._messages import Msg, PullSubscription
from daemon.platform.bus._store import Stored
from daemon.platform.logs import get_logger
from daemon.platform.nats_auth import NatsAuth

__all__ = ["FETCH_WAIT_S", "Bus"]

log = get_logger("bus")

#: Pull waits are short so a stalled fetch (nats.py #933/#986) costs at most this long.
FETCH_WAIT_S = 2.0


class Bus(Stored):
    """A connected NATS client with coleta's streams declared: publish (``Publishing``), keep
    and read back (``Stored``), pull."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        subjects: Subjects,
        options: BusOptions,
        *,
        connect_timeout_s: float = 60.0,
        auth: NatsAuth | None = None,
    ) -> AsyncIterator[Bus]:
        """Connect (retrying while the server is not up yet), declare, yield, close."""
        nc = await connect_nats(url, connect_timeout_s, auth)
        try:
            bus = cls(nc, subjects, options)
            await bus.declare()
            yield bus
        finally:
            with anyio.CancelScope(shield=True):
                # Send what is buffered (the last acks and naks) before closing; close(), not
                # drain(): drain blocks for its whole timeout after a fetch timed out.
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    if nc.is_connected:
                        await nc.flush(timeout=2)
                await nc.close()

    async def pull(self, stream: str, durable: str) -> PullSubscription:
        with nats_errors(f"binding consumer {durable}"):
            return await self.js.pull_subscribe_bind(durable=durable, stream=stream)

    async def fetch(
        self, sub: PullSubscription, batch: int, wait_s: float = FETCH_WAIT_S
    ) -> list[Msg]:
        """Up to ``batch`` messages, or none after ``wait_s``; never raises on an empty stream.

        A connection closed for good raises ``BusUnavailable``; any other failure (a server
        reconnecting or restarting) is logged and answered with none, a moment later.
        """
        try:
            return await sub.fetch(batch, timeout=wait_s)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.ConnectionClosedError as exc:
            raise from_nats(exc, "fetching messages") from exc
        except nats.errors.Error as exc:
            log.warning("bus.fetch_failed", extra={"error": str(exc) or type(exc).__name__})
            if isinstance(
                exc, nats.js.errors.ServiceUnavailableError | nats.js.errors.NotFoundError
            ):
                # Nobody serves the consumer: JetStream is starting, or lost it with its store.
                await self.recover(f"fetch failed: {exc}")
            await anyio.sleep(0.5)
            return []

    @staticmethod
    async def unsubscribe(sub: Subscription | PullSubscription) -> None:
        """Stop a subscription (pull or push), shielded; a dead connection changes nothing."""
        with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()

    async def subscribe(
        self, subject: str, callback: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription:
        """A core NATS subscription (JetStream's advisories), shared by ``queue``."""
        with nats_errors(f"subscribing to {subject}"):
            return await self.nc.subscribe(subject, queue=queue, cb=callback)
