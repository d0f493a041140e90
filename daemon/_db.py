"""PostgreSQL: the connection pool and the migrations runner.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in order, each in its
own transaction, under an advisory lock so replicas starting together apply each one once.

While PostgreSQL is down the pool keeps reconnecting on its own, never more than about
``RECONNECT_ROUND_S`` apart: psycopg_pool's backoff doubles without bound when its
``reconnect_timeout`` is infinite (1, 2, 4 … 1024 s), so after a long outage the daemon would
stay degraded for about as long again. Instead each reconnection round gives up after
``RECONNECT_ROUND_S`` and the pool starts a new one at once (see ``_reconnect_failed``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from importlib import resources

import anyio
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemon._logging import get_logger
from daemon.errors import StoreUnavailable

__all__ = ["Database", "apply_migrations", "migrations"]

log = get_logger("db")

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

SECONDS = 1.0
#: One round of reconnection attempts (at about 0, 1, 3 and 5 s): then a fresh round starts.
RECONNECT_ROUND_S = 5 * SECONDS


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every bundled migration, in order."""
    found = []
    for entry in resources.files("daemon.migrations").iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append((int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def apply_migrations(conn: psycopg.AsyncConnection[object], schema: str) -> list[str]:
    """Apply pending migrations to ``schema``; returns the names applied. Idempotent."""
    applied: list[str] = []
    lock_key = f"coleta.migrate.{schema}"
    await conn.set_autocommit(True)
    await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    await conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock_key,))
    try:
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(schema))
        )
        cur = await conn.execute(
            sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema))
        )
        done = {row[0] for row in await cur.fetchall()}  # type: ignore[index]
        for version, name, text in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema))
                )
                await conn.execute(text.encode())
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)"
                    ).format(sql.Identifier(schema)),
                    (version, name),
                )
            log.info("db.migrated", extra={"migration": name, "schema": schema})
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock_key,))
    return applied


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
        """Open the pool (waiting for the server, which may be starting), migrate, yield, close."""
        await _wait_and_migrate(url, schema, connect_timeout_s)
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
            await pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
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
            return _first_line(exc)
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
            return _first_line(exc)
        return f"no free connection in the pool within {timeout_s:g} s"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _reconnect_failed(pool: AsyncConnectionPool) -> None:
    """A round of reconnection attempts gave up: start another, so the pool never stops trying.

    ``check()`` lets the pool grow again (it gave the failed connection's slot back); the new
    attempt starts with psycopg_pool's initial delay rather than an ever longer one.
    """
    if pool.closed:
        return
    log.info("db.reconnecting", extra={"pool": pool.name, "round_s": RECONNECT_ROUND_S})
    await pool.check()


async def _wait_and_migrate(url: str, schema: str, timeout_s: float) -> None:
    deadline = anyio.current_time() + timeout_s
    delay = 0.2
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(url, connect_timeout=5) as conn:
                await apply_migrations(conn, schema)
                return
        except psycopg.OperationalError as exc:
            if anyio.current_time() + delay > deadline:
                raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
            log.warning("db.connect_retry", extra={"error": str(exc).strip(), "in_s": delay})
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
