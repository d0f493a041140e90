"""Shared pytest configuration; real-server fixtures live in the ``fix_*`` plugins."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """nats-py runs on asyncio only, so every async test does too."""
    return "asyncio"
