"""The error tree's mapping of PostgreSQL errors, and the CLI starting without psycopg."""

from __future__ import annotations

import subprocess
import sys

import psycopg

from daemon.errors import StoreRejected, StoreUnavailable, classify


def test_psycopg_errors_are_classified_by_sqlstate() -> None:
    lost = classify(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert isinstance(lost, StoreUnavailable)
    refused = psycopg.errors.lookup("54000")("index row size exceeds maximum")
    assert isinstance(classify(refused), StoreRejected)


def test_the_cli_does_not_load_the_postgresql_client() -> None:
    """``coleta status``/``health``/``trigger`` talk to NATS only; loading psycopg cost a
    seventh of each command's start (the container's health check runs one every 2 s)."""
    probe = "import sys, daemon.cli; print(sorted(m for m in sys.modules if 'psycopg' in m))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
