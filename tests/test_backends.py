"""Which servers the tests use, and a clear refusal when the one asked for cannot serve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.app import test_shutdown
from tests.fix_nats import BackendUnavailable, docker_available, server_source


def test_containers_asked_for_without_an_engine_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environ = {"COLETA_TEST_BACKEND": "containers", "DOCKER_HOST": "unix:///nonexistent/d.sock"}
    monkeypatch.setenv("DOCKER_HOST", environ["DOCKER_HOST"])
    docker_available.cache_clear()  # the session may have found an engine already
    try:
        with pytest.raises(BackendUnavailable, match="no Docker engine answers at unix:///"):
            server_source("COLETA_TEST_NATS_URL", environ)
    finally:
        docker_available.cache_clear()


def test_an_unknown_backend_is_named() -> None:
    with pytest.raises(BackendUnavailable, match="'kubernetes'"):
        server_source("X", {"COLETA_TEST_BACKEND": "kubernetes"})


def test_embedded_asked_for_is_embedded_even_with_a_url_set() -> None:
    assert server_source("X", {"COLETA_TEST_BACKEND": "embedded", "X": "nats://h:1"}) == "embedded"


def test_backend_only_keeps_exactly_the_tests_that_use_a_backend_server() -> None:
    """The second and third CI passes run with --backend-only: a test reaching NATS or
    PostgreSQL through a fixture must stay in them, one that reaches neither must not."""
    root = Path(__file__).parents[1]
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    files = ["tests/test_ids.py", "tests/app/test_shutdown.py"]
    only = subprocess.run(
        [*collect, "--backend-only", *files], cwd=root, capture_output=True, text=True, check=True
    )
    kept = {line.rpartition("::")[2] for line in only.stdout.splitlines() if "::" in line}
    shutdown_tests = {name for name in vars(test_shutdown) if name.startswith("test_")}
    assert len(shutdown_tests) == 2  # both use db_conn and the daemon
    assert kept == shutdown_tests  # and not one of test_ids.py's (no server at all)
    assert "2/" in only.stdout
