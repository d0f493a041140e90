"""Public surfaces: each package hands on exactly the names in its sorted ``__all__``.

As httpx's ``tests/test_exported_members.py`` does for httpx: a name a package exposes is in its
``__all__``, and nothing in ``__all__`` is missing. ``daemon.platform`` is a package of modules:
its ``__all__`` names them, and each module keeps its own.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import types

import pytest

import contracts
import daemon
import daemon.platform

#: Packages whose ``__init__`` re-exports its private modules' public names.
FACES = [
    "contracts",
    "daemon.app",
    "daemon.cli",
    "daemon.fetcher",
    "daemon.platform.bus",
    "daemon.platform.embedded",
    "daemon.service",
    "daemon.settings",
    "daemon.ticker",
    "daemon.writer",
]
#: Modules on their own: each ``__all__`` sorted, and every name in it there.
MODULES = [
    "daemon.errors",
    "daemon.ids",
    "daemon.jsonpath",
    "daemon.records",
    "daemon.schedule",
    "daemon.template",
    *(f"daemon.platform.{name}" for name in daemon.platform.__all__),
]


def ruff_order(name: str) -> tuple[int, str]:
    """RUF022's order for ``__all__``: CONSTANTS, then CamelCase, then the rest."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize("name", FACES + MODULES)
def test_all_is_sorted_and_every_name_in_it_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=ruff_order)
    assert [n for n in exported if not hasattr(module, n)] == []


@pytest.mark.parametrize("name", FACES)
def test_a_package_exposes_exactly_its_all(name: str) -> None:
    package = importlib.import_module(name)
    public = {
        member
        for member, value in vars(package).items()
        if not member.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(package.__all__)


def test_the_platform_names_each_of_its_modules() -> None:
    found = {
        module.name
        for module in pkgutil.iter_modules(daemon.platform.__path__)
        if not module.name.startswith("_")
    }
    assert set(daemon.platform.__all__) == found


def test_daemon_hands_on_its_version_only() -> None:
    assert daemon.__all__ == ["__version__"]
    assert contracts.__all__  # the bus's messages, checked with the others above


def test_the_installed_package_has_the_version_the_code_reports() -> None:
    # pyproject.toml reads the version from daemon/__init__.py: pip, the User-Agent, the
    # service's status and `coleta --version` all say the same.
    assert importlib.metadata.version("coleta") == daemon.__version__
