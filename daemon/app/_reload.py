"""SIGHUP: read the config again and apply its sources without a restart.

A valid new config replaces the sources of every stage (``Daemon.apply``): the ticker re-plans
its heap, the fetcher and the service see the new sources at once, retention reads them on its
next pass; its secrets are masked in everything the process says from then on (``redact``).
Settings that shape connections and streams (URLs, prefix, schema, concurrency …) need a
restart: a change to them is logged and otherwise ignored. An invalid config is one error line
naming the key; the running config is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
import msgspec

from daemon.errors import ConfigError
from daemon.platform.logs import get_logger
from daemon.settings import Settings, load_settings

__all__ = ["Reloadable", "reload_config"]

log = get_logger("reload")


class Reloadable(Protocol):
    """What a reload acts on: the running daemon (``Daemon``)."""

    settings: Settings

    def apply(self, settings: Settings) -> None:
        """Use these settings' sources in every stage from now on, and mask their secrets."""

    async def bus_fits_sources(self) -> None:
        """Let the fetcher's consumer deliver as often as the sources' retry budgets need."""


async def reload_config(
    daemon: Reloadable,
    path: str | Path | None,
    *,
    load: Callable[[str | Path | None], Settings] = load_settings,
) -> bool:
    """Load ``path`` (or ``$COLETA_CONFIG``) and apply its sources; False if it is invalid."""
    old = daemon.settings
    try:
        new = await anyio.to_thread.run_sync(load, path)
    except ConfigError as exc:
        log.error("config.reload_failed", extra={"error": str(exc), "kept": "running config"})
        return False
    needs_restart = [
        field.name
        for field in msgspec.structs.fields(Settings)
        if field.name != "sources" and getattr(new, field.name) != getattr(old, field.name)
    ]
    before = {source.name: source for source in old.sources}
    after = {source.name: source for source in new.sources}
    daemon.apply(msgspec.structs.replace(old, sources=new.sources))
    await daemon.bus_fits_sources()
    log.info(
        "config.reloaded",
        extra={
            "added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(n for n in after.keys() & before.keys() if after[n] != before[n]),
            "needs_restart": needs_restart,
        },
    )
    return True
