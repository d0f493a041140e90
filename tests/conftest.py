"""Shared pytest configuration; real-server fixtures live in the ``fix_*`` plugins."""

import pytest

#: The fixtures through which a test reaches the chosen backend's NATS server or PostgreSQL
#: (every other backend fixture derives from one of them).
BACKEND_FIXTURES = frozenset({"nats_url", "database_url"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend-only",
        action="store_true",
        help="run only the tests that use the backend's NATS server or PostgreSQL: for a "
        "second pass on another backend (the rest do not depend on it and ran in the first)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("backend_only"):
        return
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        uses = BACKEND_FIXTURES & set(getattr(item, "fixturenames", ()))
        (keep if uses else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def anyio_backend() -> str:
    """nats-py runs on asyncio only, so every async test does too."""
    return "asyncio"
