"""Which servers the tests use, and a clear refusal when the one asked for cannot serve."""

from __future__ import annotations

import pytest

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
