"""A real PostgreSQL for the tests, and a throwaway schema per test.

The server comes from, in order: ``COLETA_TEST_DATABASE_URL``; a testcontainers container
when a Docker engine answers; the embedded PostgreSQL of ``daemon.platform.embedded`` (pgserver),
started once per session in a temporary state directory. Each test gets its own schema.

Embedded PostgreSQL state lives outside pytest's temp root: as root, pgserver runs the server
as a ``pgserver`` user that must traverse every parent directory, and each pytest session
start chmods ``/tmp/pytest-of-root`` back to 0700, which breaks a server starting or stopping
in any concurrent session.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from anyio.from_thread import start_blocking_portal
from psycopg import sql
from psycopg.rows import TupleRow

from daemon.platform.embedded import embedded_postgres
from tests.fix_nats import server_source, started_container

DATABASE_URL_ENV = "COLETA_TEST_DATABASE_URL"
POSTGRES_IMAGE = "postgres:16-alpine"

_chosen: dict[str, str] = {}  # what database_url resolved to, for the terminal summary


def pytest_report_header() -> str:
    return f"coleta: postgres from {server_source(DATABASE_URL_ENV)}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _chosen:
        terminalreporter.write_line(f"coleta: postgres={_chosen['url']} ({_chosen['source']})")


@contextlib.contextmanager
def server_state_dir(name: str) -> Iterator[Path]:
    """A throwaway state directory for embedded servers, outside pytest's temp root."""
    path = Path(tempfile.mkdtemp(prefix=f"coleta-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A psycopg conninfo URL of a PostgreSQL server shared by the whole session."""
    source = server_source(DATABASE_URL_ENV)
    if source == "env":
        url = os.environ[DATABASE_URL_ENV]
        _chosen.update(url=url, source=source)
        yield url
    elif source == "container":
        from testcontainers.community.postgres import PostgresContainer

        with started_container(PostgresContainer(POSTGRES_IMAGE, driver=None)) as container:
            url = container.get_connection_url(driver=None)
            _chosen.update(url=url, source=source)
            yield url
    else:
        with (
            server_state_dir("embedded-pg") as state_dir,
            start_blocking_portal("asyncio", name="embedded-postgres") as portal,
            portal.wrap_async_context_manager(embedded_postgres(state_dir)) as url,
        ):
            _chosen.update(url=url, source=source)
            yield url


@pytest.fixture
def db_schema(database_url: str) -> Iterator[str]:
    """A fresh schema (``t`` + 8 hex) in the test database, dropped with CASCADE afterwards."""
    schema = f"t{secrets.token_hex(4)}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield schema
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")  # a leaked connection fails, not hangs, us
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def db_conn(database_url: str, db_schema: str) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit connection whose search_path is the test's schema, to check rows."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(db_schema)))
        yield conn
