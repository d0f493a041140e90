"""PostgreSQL: the connection pool every stage shares, on coleta's schema (migrated first:
``migrate``).

While PostgreSQL is down the pool keeps reconnecting on its own, never more than about
``RECONNECT_ROUND_S`` apart: psycopg_pool's backoff doubles without bound when its
``reconnect_timeout`` is infinite (1, 2, 4 … 1024 s), so after a long outage the daemon would
stay degraded for about as long again. Instead each reconnection round gives up after
``RECONNECT_ROUND_S`` and the pool starts a new one at once (see ``_reconnect_failed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemon.errors import StoreUnavailable, first_line
from daemon.platform import phase, spans
from daemon.platform.logs import get_logger
from daemon.platform.migrate import wait_and_migrate
from daemon.platform.redact import redact_text
from daemon.platform.spans import Span

__all__ = ["RECONNECT_ROUND_S", "Database"]

log = get_logger("db")

SECONDS = 1.0
#: One round of reconnection attempts (at about 0, 1, 3 and 5 s): then a fresh round starts.
RECONNECT_ROUND_S = 5 * SECONDS


class Database:
    """A pool of connections whose ``search_path`` is coleta's schema."""

    def __init__(self, pool: AsyncConnectionPool, schema: str, *, url: str = "") -> None:
        self.pool = pool
        self.schema = schema
        #: Where the pool connects, for ``ping`` to ask PostgreSQL directly why it cannot.
        self.url = url

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, url: str, schema: str, *, max_size: int = 4, connect_timeout_s: float = 60.0
    ) -> AsyncIterator[Database]:
        """Open the pool (waiting for the server, which may be starting), migrate, yield, close.

        Every wait here can be cancelled (a signal during start-up): the pool is closed
        whether it opened or not, so none of its workers outlives the call.
        """
        await wait_and_migrate(url, schema, connect_timeout_s)
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            name="coleta",
            kwargs={"options": f"-c search_path={schema}", "autocommit": False},
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=RECONNECT_ROUND_S,
            reconnect_failed=_reconnect_failed,
        )
        try:
            phase.waiting_for(f"PostgreSQL at {redact_text(url)} (connection pool)")
            try:
                await pool.open(wait=True, timeout=connect_timeout_s)
            except PoolTimeout as exc:
                raise StoreUnavailable(
                    f"cannot reach PostgreSQL at {redact_text(url)}"
                    f" within {connect_timeout_s:g} s: {exc}"
                ) from exc
            yield cls(pool, schema, url=url)
        finally:
            with anyio.CancelScope(shield=True):
                await pool.close(timeout=5)

    async def ping(self, timeout_s: float = 2.0) -> str | None:
        """None when the database answers, else the reason it does not.

        When the pool has no connection to give within half the time, a direct connection
        attempt says why: PostgreSQL down or refusing connections reads differently from a
        pool whose connections are all busy.
        """
        try:
            with anyio.fail_after(timeout_s):
                async with self.pool.connection(timeout=timeout_s / 2) as conn:
                    await conn.execute("SELECT 1")
        except PoolTimeout:
            return await self._why_no_connection(timeout_s / 2)
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except psycopg.Error as exc:
            return first_line(exc)
        return None

    async def _why_no_connection(self, timeout_s: float) -> str:
        if not self.url:
            return f"no connection within {timeout_s:g} s"
        try:
            with anyio.fail_after(timeout_s):
                connecting = psycopg.AsyncConnection.connect(
                    self.url, connect_timeout=max(2, round(timeout_s))
                )
                async with await connecting:
                    pass
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except psycopg.Error as exc:
            return first_line(exc)
        return f"no free connection in the pool within {timeout_s:g} s"

    def statement_span(
        self, conn: psycopg.AsyncConnection[Any], table: str, count: int, operation: str = "INSERT"
    ) -> AbstractContextManager[Span]:
        """The CLIENT span of one statement on ``table`` (``executemany`` of ``count``
        parameter sets), named and described from the connection (no round trip)."""
        info = conn.info
        return spans.db_span(
            operation,
            table,
            batch_size=count,
            namespace=f"{info.dbname}.{self.schema}",
            server_address=info.host,
            server_port=info.port,
        )


async def _reconnect_failed(pool: AsyncConnectionPool) -> None:
    """A round of reconnection attempts gave up: start another, so the pool never stops trying.

    ``check()`` lets the pool grow again (it gave the failed connection's slot back); the new
    attempt starts with psycopg_pool's initial delay rather than an ever longer one.
    """
    if pool.closed:
        return
    log.info("db.reconnecting", extra={"pool": pool.name, "round_s": RECONNECT_ROUND_S})
    await pool.check()
