"""The daemon as a PostgreSQL role with only the rights it needs.

The schema's owner runs ``coleta migrate --grant-to ROLE`` (or the README's SQL); the daemon
then connects as ROLE, which may read and write rows but create nothing: it collects, records
failed runs, prunes, keeps source state and streams large bodies through COPY, and a role that
cannot apply a pending migration is told which one, and by whom to have it applied.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
import pytest
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from daemon.app import open_daemon
from daemon.errors import FatalError
from daemon.platform.db import Database
from tests import ROOT
from tests._collect import FAST_RETRY, run, source
from tests._proc import clean_env, coleta
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

README = ROOT / "README.md"
LARGE_BODY = {"pad": "x" * 3_000_000}  # over NATS's 1 MiB: the object store, then COPY


def as_role(url: str, role: str) -> str:
    """The same server and database, logged in as ``role`` with its password (a server that
    trusts local users ignores it; a container's PostgreSQL asks for it)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password_of(role)}@{host}"))


def password_of(role: str) -> str:
    return f"pw-{role}-pw"


@pytest.fixture
def make_role(database_url: str, db_schema: str) -> Iterator[Any]:
    """``make_role()`` → a new LOGIN role with no rights; dropped (with its grants) after the
    test, before the schema is."""
    made: list[str] = []

    def make() -> str:
        name = f"coleta_t{secrets.token_hex(4)}"
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password_of(name))
                )
            )
        made.append(name)
        return name

    yield make
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def migrate(database_url: str, schema: str, *args: str) -> str:
    done = coleta(
        "migrate", *args, env=clean_env(DATABASE_URL=database_url, COLETA_DATABASE_SCHEMA=schema)
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_old_history(conn: psycopg.Connection[TupleRow], source: str, days: int) -> None:
    """A run and its row from ``days`` ago, written by the owner, for retention to prune."""
    when = datetime.now(UTC) - timedelta(days=days)
    conn.execute(
        "INSERT INTO collection_runs (run_id, source, trigger, scheduled_for, status, created_at)"
        " VALUES ('old', %(source)s, 'schedule', %(when)s, 'stored', %(when)s)",
        {"source": source, "when": when},
    )
    conn.execute(
        "INSERT INTO collected_data (run_id, source, collected_at, data)"
        " VALUES ('old', %(source)s, %(when)s, '{}')",
        {"source": source, "when": when},
    )


def old_history(conn: psycopg.Connection[TupleRow]) -> list[TupleRow]:
    return conn.execute(
        "SELECT 'run' FROM collection_runs WHERE run_id = 'old'"
        " UNION ALL SELECT 'row' FROM collected_data WHERE run_id = 'old'"
    ).fetchall()


def privileges(conn: psycopg.Connection[TupleRow], role: str, schema: str) -> set[tuple[str, ...]]:
    """Every right ``role`` holds on the schema, its tables and columns, and the database."""
    found: set[tuple[str, ...]] = set()
    for query in (
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
        " WHERE grantee = %(role)s AND table_schema = %(schema)s",
        "SELECT table_name || '.' || column_name, privilege_type"
        " FROM information_schema.column_privileges"
        " WHERE grantee = %(role)s AND table_schema = %(schema)s",
        "SELECT 'schema', p FROM unnest(ARRAY['USAGE', 'CREATE']) AS p"
        " WHERE has_schema_privilege(%(role)s, %(schema)s, p)",
        "SELECT 'database', p FROM unnest(ARRAY['CONNECT', 'TEMPORARY', 'CREATE']) AS p"
        " WHERE has_database_privilege(%(role)s, current_database(), p)",
    ):
        found.update(conn.execute(query, {"role": role, "schema": schema}).fetchall())
    return found


def readme_grants() -> str:
    """The SQL block of the README's "PostgreSQL roles" section."""
    section = README.read_text().split("### PostgreSQL roles", 1)[1]
    match = re.search(r"```sql\n(.*?)```", section, re.DOTALL)
    assert match, "no SQL block in the README's PostgreSQL roles section"
    return match[1]


async def test_the_daemon_runs_as_a_role_that_cannot_create_anything(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[TupleRow],
    database_url: str,
    db_schema: str,
    make_role: Any,
) -> None:
    role = make_role()
    migrate(database_url, db_schema, "--grant-to", role)
    add_old_history(db_conn, "rates", days=30)
    assert old_history(db_conn) == [("run",), ("row",)]
    api.route("/rates", json={"EUR": 1}, headers={"ETag": '"v1"'})
    api.route("/big", json=LARGE_BODY)
    sources = [
        source(api, "rates", "/rates", retention_days=7),
        source(api, "big", "/big", timeout_s=60),
        source(api, "gone", "/gone", retries=FAST_RETRY),
    ]
    settings = make_settings(sources, database_url=as_role(database_url, role))

    async with open_daemon(settings):
        await wait_for(lambda: not old_history(db_conn), what="retention to prune old history")
        rates = await run(request_reply, db_conn, "rates")
        big = await run(request_reply, db_conn, "big")
        gone = await run(request_reply, db_conn, "gone")

    assert (rates["status"], rates["rows"]) == ("stored", 1)
    assert (big["status"], big["rows"]) == ("stored", 1)
    assert (gone["status"], gone["http_status"]) == ("failed", 404)
    assert db_conn.execute(
        "SELECT source, data = %s::jsonb FROM collected_data ORDER BY source",
        (Jsonb(LARGE_BODY),),
    ).fetchall() == [("big", True), ("rates", False)]
    assert db_conn.execute("SELECT etag FROM source_state WHERE source = 'rates'").fetchall() == [
        ('"v1"',)
    ]
    with psycopg.connect(as_role(database_url, role), autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(db_schema)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("CREATE TABLE intruder (n int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="collected_data"):
            conn.execute("SELECT data FROM collected_data")  # it writes data, never reads it


async def test_a_role_that_cannot_migrate_names_the_missing_migration(
    database_url: str, db_schema: str, db_conn: psycopg.Connection[TupleRow], make_role: Any
) -> None:
    role = make_role()
    migrate(database_url, db_schema, "--grant-to", role)
    db_conn.execute("DELETE FROM schema_migrations WHERE version = 5")  # as after an upgrade

    with pytest.raises(FatalError) as caught:
        async with Database.open(as_role(database_url, role), db_schema, connect_timeout_s=10):
            pass

    message = str(caught.value)
    assert "0005_content_addressed_rows.sql" in message
    assert "0004" not in message
    assert f"role {role!r}" in message
    assert "permission denied" in message
    assert "coleta migrate" in message
    assert db_conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (4,)


async def test_a_role_on_an_unmigrated_schema_names_every_migration(
    database_url: str, db_schema: str, make_role: Any
) -> None:
    role = make_role()

    with pytest.raises(FatalError) as caught:
        async with Database.open(as_role(database_url, role), db_schema, connect_timeout_s=10):
            pass

    assert "0001_init.sql" in str(caught.value)
    assert "0005_content_addressed_rows.sql" in str(caught.value)
    as_daemon = coleta(
        "migrate",
        env=clean_env(DATABASE_URL=as_role(database_url, role), COLETA_DATABASE_SCHEMA=db_schema),
    )
    assert as_daemon.returncode == 2
    assert as_daemon.stderr.startswith(f"coleta: schema {db_schema!r} lacks migrations 0001_init")
    assert len(as_daemon.stderr.splitlines()) == 1


async def test_a_role_without_grants_is_told_to_get_them(
    database_url: str, db_schema: str, make_role: Any
) -> None:
    role = make_role()
    migrate(database_url, db_schema)

    with pytest.raises(FatalError, match=rf"may not read {db_schema}\.schema_migrations") as caught:
        async with Database.open(as_role(database_url, role), db_schema, connect_timeout_s=10):
            pass

    assert f"role {role!r}" in str(caught.value)
    assert "coleta migrate --grant-to" in str(caught.value)


def test_the_readme_grants_what_grant_to_grants(
    database_url: str, db_schema: str, db_conn: psycopg.Connection[TupleRow], make_role: Any
) -> None:
    by_cli, by_readme = make_role(), make_role()
    migrate(database_url, db_schema, "--grant-to", by_cli)
    text = re.sub(r"\bcoleta_daemon\b", by_readme, readme_grants())
    text = re.sub(r"\bcoleta\b", db_schema, text)
    db_conn.execute(re.sub(r"\bmydb\b", db_conn.info.dbname, text).encode())

    granted = privileges(db_conn, by_cli, db_schema)
    assert granted == privileges(db_conn, by_readme, db_schema)
    assert ("collection_runs", "DELETE") in granted
    assert ("collected_data.data", "SELECT") not in granted
    assert ("schema", "CREATE") not in granted
    assert ("database", "CREATE") not in granted


def test_grant_to_a_role_that_does_not_exist_is_one_clear_line(
    database_url: str, db_schema: str
) -> None:
    done = coleta(
        "migrate",
        "--grant-to",
        "no_such_role_x",
        env=clean_env(DATABASE_URL=database_url, COLETA_DATABASE_SCHEMA=db_schema),
    )

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        'coleta: --grant-to no_such_role_x: role "no_such_role_x" does not exist'
    ]
