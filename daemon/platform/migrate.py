"""The migrations runner: coleta's tables, created and changed by numbered SQL files.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in order, each in its
own transaction, under an advisory lock so replicas starting together apply each one once.
With all of them applied, start-up only reads ``schema_migrations``: a daemon may run as a role
that cannot create anything, holding only the rights of ``GRANTS`` (``coleta migrate
--grant-to ROLE``). Such a role meeting a pending migration says which, and who can apply it.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import anyio
import psycopg
import psycopg.errors
from psycopg import sql

from daemon.errors import ConfigError, FatalError, StoreUnavailable, first_line
from daemon.platform import phase
from daemon.platform.logs import get_logger
from daemon.platform.redact import redact_text
from daemon.platform.retry import Backoff, Retrying, retry

__all__ = ["GRANTS", "apply_migrations", "grant", "migrations", "wait_and_migrate"]

log = get_logger("db")

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

#: Waits between connection attempts: 0.2 s, doubling up to 5 s.
_BACKOFF = Backoff(first_s=0.2, cap_s=5.0)


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every bundled migration, in order."""
    found = []
    for entry in resources.files("daemon.migrations").iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append((int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


#: The rights of the daemon's role, and no more: no DDL. ``collected_data`` is written and
#: pruned but never read, except the columns that find a row (the conflict key, retention's
#: ``source`` and ``collected_at``); the large-body path needs a temporary table.
GRANTS = (
    "GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {role}",
    "GRANT USAGE ON SCHEMA {schema} TO {role}",
    "GRANT SELECT ON {schema}.schema_migrations TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.collection_runs TO {role}",
    "GRANT SELECT (id, run_id, source, page, record, collected_at, content_sha256),"
    " INSERT, DELETE ON {schema}.collected_data TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON {schema}.source_state TO {role}",
)


async def grant(conn: psycopg.AsyncConnection[Any], schema: str, role: str) -> None:
    """Give ``role`` the rights of ``GRANTS`` on ``schema`` (migrated): ConfigError naming the
    role when PostgreSQL refuses (no such role, not the owner)."""
    names = {
        "database": sql.Identifier(conn.info.dbname),
        "schema": sql.Identifier(schema),
        "role": sql.Identifier(role),
    }
    try:
        async with conn.transaction():
            for statement in GRANTS:
                await conn.execute(sql.SQL(statement).format(**names))
    except psycopg.errors.ProgrammingError as exc:  # undefined role, insufficient privilege
        raise ConfigError(f"--grant-to {role}: {first_line(exc)}") from exc
    log.info("db.granted", extra={"role": role, "schema": schema})


async def apply_migrations(conn: psycopg.AsyncConnection[Any], schema: str) -> list[str]:
    """Apply pending migrations to ``schema``; returns the names applied. Idempotent.

    Nothing pending: no DDL at all, not even ``IF NOT EXISTS``, which PostgreSQL refuses to a
    role without CREATE. Pending, and the role may not apply them: FatalError naming them.
    """
    await conn.set_autocommit(True)
    pending = await _pending(conn, schema)
    if not pending:
        return []
    try:
        return await _apply(conn, schema)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise FatalError(
            f"schema {schema!r} lacks {_plural('migration', pending)} {', '.join(pending)},"
            f" which role {conn.info.user!r} may not apply ({first_line(exc)}): run"
            " `coleta migrate` as the schema's owner, with `--grant-to` this role"
        ) from exc


async def _pending(conn: psycopg.AsyncConnection[Any], schema: str) -> list[str]:
    """The names of the migrations not applied to ``schema``, read without DDL or locks."""
    cur = await conn.execute(
        "SELECT 1 FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = 'schema_migrations'",
        (schema,),
    )
    done: set[int] = set()
    if await cur.fetchone() is not None:
        try:
            cur = await conn.execute(
                sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema))
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            raise FatalError(
                f"role {conn.info.user!r} may not read {schema}.schema_migrations"
                f" ({first_line(exc)}): grant it the daemon's rights with"
                " `coleta migrate --grant-to` as the schema's owner"
            ) from exc
        done = {row[0] for row in await cur.fetchall()}
    return [name for version, name, _ in migrations() if version not in done]


async def _apply(conn: psycopg.AsyncConnection[Any], schema: str) -> list[str]:
    applied: list[str] = []
    lock_key = f"coleta.migrate.{schema}"
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
        done = {row[0] for row in await cur.fetchall()}
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


def _plural(noun: str, items: list[str]) -> str:
    return noun if len(items) == 1 else f"{noun}s"


async def wait_and_migrate(url: str, schema: str, timeout_s: float) -> None:
    """Connect (retrying until ``timeout_s``: the server may be starting) and migrate.

    Past ``timeout_s``: ``StoreUnavailable`` naming the server and the last error PostgreSQL
    (or the network) gave. A last attempt cut short by the deadline does not hide it: "no
    answer" only when no attempt got one. Waiting for the migrations lock has no deadline
    (another replica is migrating), but a cancelled caller stops it at once (``_migrate``).
    """
    where = f"PostgreSQL at {redact_text(url)}"
    deadline = anyio.current_time() + timeout_s
    last_error: psycopg.Error | None = None

    async def attempt() -> psycopg.AsyncConnection[Any]:
        nonlocal last_error
        try:
            with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                return await psycopg.AsyncConnection.connect(url, connect_timeout=5)
        except psycopg.Error as exc:
            last_error = exc
            raise

    def retrying(failed: Retrying) -> None:
        error = _error(failed.error)
        log.warning(
            "db.connect_retry",
            extra={"error": error, "retry": failed.attempt, "in_s": failed.delay_s},
        )
        phase.waiting_for(f"{where} (connect retry {failed.attempt})")

    phase.waiting_for(where)
    try:
        conn = await retry(
            attempt,
            retry_on=lambda exc: isinstance(exc, psycopg.OperationalError | TimeoutError),
            backoff=_BACKOFF,
            deadline=deadline,
            on_retry=retrying,
        )
    except (psycopg.OperationalError, TimeoutError) as exc:
        raise StoreUnavailable(
            f"cannot reach {where} within {timeout_s:g} s: {_error(last_error or exc)}"
        ) from exc
    async with conn:
        phase.waiting_for(
            f"the migrations of schema {schema!r} (lock coleta.migrate.{schema}) on {where}"
        )
        await _migrate(conn, schema)


def _error(exc: BaseException) -> str:
    return first_line(exc) if isinstance(exc, psycopg.Error) else "no answer"


async def _migrate(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """``apply_migrations``, stopped cleanly when the caller is cancelled.

    Cancelling a psycopg query from an anyio scope drops the connection (psycopg's own cancel
    request is itself cancelled), and a backend waiting for the migrations lock does not
    notice that until it gets the lock. So the migrations run shielded, and a cancellation
    sends PostgreSQL a cancel request instead: the statement (usually the wait for the lock)
    ends with ``QueryCanceled`` and the cancellation goes on from here.
    """
    stopping = done = False

    async def cancel_on_stop() -> None:
        nonlocal stopping
        try:
            await anyio.sleep_forever()
        finally:
            if not done:
                stopping = True
                with anyio.CancelScope(shield=True):
                    await conn.cancel_safe(timeout=5)

    failed: Exception | None = None  # raised after the task group, not inside an exception group
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_stop, name="migrations-cancel")
        try:
            with anyio.CancelScope(shield=True):
                await apply_migrations(conn, schema)
        except psycopg.errors.QueryCanceled as exc:
            failed = None if stopping else exc
        except Exception as exc:
            failed = exc
        done = True
        tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
