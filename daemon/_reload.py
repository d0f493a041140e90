"""SIGHUP: read the config again and apply its sources without a restart.

A valid new config replaces the sources of every stage (``Daemon.apply``): the ticker re-plans
its heap, the fetcher and the service see the new sources at once, retention reads them on its
next pass. Settings that shape connections and streams (URLs, prefix, schema, concurrency …)
need a restart: a change to them is logged and otherwise ignored. An invalid config is one
error line naming the key; the running config is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec

from daemon._logging import get_logger
from daemon.errors import ConfigError
from daemon.settings import Settings, load_settings

if TYPE_CHECKING:
    from daemon.app import Daemon

__all__ = ["reload_config"]

log = get_logger("reload")


async def reload_config(
    daemon: Daemon,
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
