"""A real NATS JetStream server for the tests, and a per-test namespace on it.

The server comes from, in order: ``COLETA_TEST_NATS_URL``; a testcontainers container when a
Docker engine answers; the embedded nats-server of ``daemon.platform.embedded``, started once per
session in a temporary state directory. Tests isolate themselves by naming their subjects,
streams and buckets after ``bus_prefix``, which is cleaned up after each test.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import secrets
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import anyio
import nats
import nats.js.errors
import pytest
from anyio.from_thread import start_blocking_portal

from daemon.platform.embedded import embedded_nats

Source = Literal["env", "container", "embedded"]
T = TypeVar("T")

NATS_URL_ENV = "COLETA_TEST_NATS_URL"
NATS_IMAGE = "nats:2.10-alpine"
BUCKET_STREAM_PREFIXES = ("KV_", "OBJ_")  # how KV and object-store buckets are stored

_chosen: dict[str, str] = {}  # what nats_url resolved to, for the terminal summary


@functools.cache
def docker_available() -> bool:
    """True when a Docker engine answers; without one the ping fails at once."""
    with warnings.catch_warnings():
        # docker-py leaks its socket when nothing listens; collect it here, silently, rather
        # than have a later test fail on the ResourceWarning.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            docker.from_env(timeout=3).ping()
        except Exception:
            return False
        finally:
            gc.collect()
    return True


#: ``COLETA_TEST_BACKEND=containers``: the servers must be containers (CI's testcontainers
#: pass); ``embedded``: the embedded servers even where an engine answers.
BACKEND_ENV = "COLETA_TEST_BACKEND"


class BackendUnavailable(Exception):
    """The backend asked for cannot give its servers: say so instead of falling back."""


def server_source(env_var: str, environ: Mapping[str, str] | None = None) -> Source:
    """Where a test server comes from: the env variable, else a container, else embedded —
    or exactly what ``COLETA_TEST_BACKEND`` asks for."""
    environ = os.environ if environ is None else environ
    wanted = environ.get(BACKEND_ENV, "")
    if wanted == "containers":
        if not docker_available():
            raise BackendUnavailable(
                f"{BACKEND_ENV}=containers, but no Docker engine answers at"
                f" {environ.get('DOCKER_HOST') or 'the default socket'}: start one"
                " (../shared/containers/engine.sh start, then eval its env) or unset"
                f" {BACKEND_ENV}"
            )
        return "container"
    if wanted == "embedded":
        return "embedded"
    if wanted:
        raise BackendUnavailable(
            f"{BACKEND_ENV}={wanted!r}: expected 'containers' or 'embedded' (unset: automatic)"
        )
    if environ.get(env_var):
        return "env"
    if docker_available():
        return "container"
    return "embedded"


@contextlib.contextmanager
def started_container(container: Any) -> Iterator[Any]:
    """Start a testcontainers container; a failure says which image and why, once, instead
    of a traceback per test (and never falls back to another backend)."""
    try:
        container.start()
    except Exception as exc:
        raise BackendUnavailable(
            f"cannot start a {container.image} container: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        yield container
    finally:
        container.stop()


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run `fn` in a private event loop on a worker thread: safe from sync and async tests."""

    async def call() -> T:
        return await fn()

    with ThreadPoolExecutor(1, thread_name_prefix="fix-nats") as pool:
        return pool.submit(anyio.run, call).result()


def pytest_report_header() -> str:
    return f"coleta: nats from {server_source(NATS_URL_ENV)}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _chosen:
        terminalreporter.write_line(f"coleta: nats={_chosen['url']} ({_chosen['source']})")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a NATS server with JetStream, shared by the whole session."""
    source = server_source(NATS_URL_ENV)
    if source == "env":
        url = os.environ[NATS_URL_ENV]
        _chosen.update(url=url, source=source)
        yield url
    elif source == "container":
        from testcontainers.community.nats import NatsContainer

        with started_container(NatsContainer(NATS_IMAGE, jetstream=True)) as container:
            url = container.nats_uri()
            _chosen.update(url=url, source=source)
            yield url
    else:
        state_dir = tmp_path_factory.mktemp("embedded-nats")
        with (
            start_blocking_portal("asyncio", name="embedded-nats") as portal,
            portal.wrap_async_context_manager(embedded_nats(state_dir)) as server,
        ):
            _chosen.update(url=server.url, source=source)
            yield server.url_with_password  # it accepts only its own user


@pytest.fixture
def bus_prefix(nats_url: str) -> Iterator[str]:
    """A fresh lowercase prefix (``t`` + 8 hex) for one test's subjects, streams and buckets.

    Afterwards every stream named ``<PREFIX>_…`` and every KV / object-store bucket named
    ``<prefix>…`` is deleted, so tests sharing one server never see each other's data.
    """
    prefix = f"t{secrets.token_hex(4)}"
    yield prefix
    run_async(lambda: delete_prefixed_streams(nats_url, prefix))


async def delete_prefixed_streams(url: str, prefix: str) -> list[str]:
    """Delete the streams and buckets of one test; returns the deleted stream names."""
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        names: list[str] = []
        while page := await js.streams_info(offset=len(names)):
            names.extend(info.config.name or "" for info in page)
        # Paging by offset can list a name twice while other clients add or remove streams.
        doomed = sorted({name for name in names if _belongs_to(name, prefix)})
        for name in doomed:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        return doomed
    finally:
        await nc.close()


def _belongs_to(stream: str, prefix: str) -> bool:
    for bucket_prefix in BUCKET_STREAM_PREFIXES:
        if stream.startswith(bucket_prefix):
            return stream.removeprefix(bucket_prefix).lower().startswith(prefix)
    return stream.startswith(prefix.upper() + "_")
