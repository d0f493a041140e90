"""Whether each source stored a run recently enough, and whether it keeps failing.

A source is **late** when its last stored (or unchanged) run finished longer ago than its
freshness window (``SourceConfig.freshness_window_s``: ``freshness_s``, or the default from
its schedule). A source that never stored a run is measured from when it was first seen: the
earlier of its first recorded run and the moment this service started (or reloaded) with it
in its configuration, so a new source is not late at start, and restarting the daemon does not
make a source that never stored anything fresh again. A source is **failing** when its last
``failures_before_degraded`` runs failed. A disabled source is neither.

Judged from PostgreSQL, so every replica answers the same (but for a source with no run at
all, which each measures from its own start). ``coleta.health`` judges every source with one
query; so does the sampler behind the ``coleta.source.*`` gauges, every
``FRESHNESS_SAMPLE_EVERY_S`` while something reads the metrics; ``coleta.status`` judges each
page from the summaries it reads anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import anyio
import anyio.to_thread

from contracts import HEALTH_SOURCES_LISTED, ComponentHealth
from daemon.errors import StoreRejected, StoreUnavailable, psycopg_errors
from daemon.platform import metrics
from daemon.platform.clock import Clock
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.service._history import RunHistory, run_histories
from daemon.settings import Settings, SourceConfig, format_duration

__all__ = [
    "FRESHNESS_SAMPLE_EVERY_S",
    "Freshness",
    "FreshnessWatch",
    "SourcesHealth",
    "freshness_windows",
]

log = get_logger("service")

#: How often the ``coleta.source.*`` gauges are evaluated again (one query for all sources).
FRESHNESS_SAMPLE_EVERY_S = 30.0
#: Sources of each kind a health ``reason`` names; the rest are counted.
_NAMED_IN_REASON = 10


@dataclass(frozen=True, slots=True)
class Freshness:
    """One source, judged at one instant."""

    source: str
    #: Seconds since its last stored run finished (``stored``), or since it was first seen.
    age_s: float
    stored: bool
    #: How long it may go without a stored run (``inf``: a schedule that never fires).
    window_s: float
    late: bool
    consecutive_failures: int
    failures_limit: int
    failing: bool

    def gauges(self) -> metrics.SourceGauges:
        return metrics.SourceGauges(self.age_s, self.late, self.consecutive_failures)

    def why_late(self) -> str:
        age = format_duration(self.age_s)
        since = (
            f"no stored run for {age}"
            if self.stored
            else f"no stored run yet, first seen {age} ago"
        )
        return f"{self.source} ({since}; expected within {format_duration(self.window_s)})"

    def why_failing(self) -> str:
        return f"{self.source} ({self.consecutive_failures} failed runs in a row)"


@dataclass(frozen=True, slots=True)
class SourcesHealth:
    """The ``sources`` entry of a health reply, and the sources it names."""

    check: ComponentHealth
    late: list[str]
    failing: list[str]

    @classmethod
    def of(cls, judged: Sequence[Freshness]) -> SourcesHealth:
        late = [f for f in judged if f.late]
        failing = [f for f in judged if f.failing]
        problems = []
        if late:
            problems.append("late: " + _some([f.why_late() for f in late]))
        if failing:
            problems.append("failing: " + _some([f.why_failing() for f in failing]))
        check = ComponentHealth(ok=not problems, detail="; ".join(problems) or "ok")
        return cls(
            check=check,
            late=[f.source for f in late[:HEALTH_SOURCES_LISTED]],
            failing=[f.source for f in failing[:HEALTH_SOURCES_LISTED]],
        )


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_NAMED_IN_REASON])
    if len(items) > _NAMED_IN_REASON:
        shown += f" and {len(items) - _NAMED_IN_REASON:,} more"
    return shown


async def freshness_windows(sources: Sequence[SourceConfig]) -> list[float]:
    """Each source's freshness window. In a worker thread: the default is computed from the
    schedule once per (schedule, timezone), a few milliseconds of croniter each."""
    return await anyio.to_thread.run_sync(
        lambda: [src.freshness_window_s for src in sources], abandon_on_cancel=True
    )


class FreshnessWatch:
    """Judges sources' freshness for the service, and keeps the gauges up to date."""

    def __init__(self, db: Database, clock: Clock, settings: Settings) -> None:
        self._db = db
        self._clock = clock
        #: Source → when this service first had it in its configuration.
        self._seen: dict[str, datetime] = {}
        self.settings = settings
        self.reload(settings)

    def reload(self, settings: Settings) -> None:
        """Judge these sources from now on; one new to this service is first seen now."""
        now = self._clock.now()
        self._seen = {src.name: self._seen.get(src.name, now) for src in settings.sources}
        self.settings = settings

    def now(self) -> datetime:
        return self._clock.now()

    def judge(
        self, source: SourceConfig, history: RunHistory, window_s: float, now: datetime
    ) -> Freshness:
        """``source``'s freshness at ``now``, from its run history."""
        since = history.stored_at
        if since is None:
            candidates = [self._seen.get(source.name, now), history.first_run_at]
            since = min(t for t in candidates if t is not None)
        age_s = max(0.0, (now - since).total_seconds())
        limit = self.settings.failures_limit(source)
        failures = history.consecutive_failures
        return Freshness(
            source=source.name,
            age_s=age_s,
            stored=history.stored_at is not None,
            window_s=window_s,
            late=source.enabled and math.isfinite(window_s) and age_s > window_s,
            consecutive_failures=failures,
            failures_limit=limit,
            failing=source.enabled and failures >= limit,
        )

    async def evaluate(self) -> list[Freshness]:
        """Every source, in config order, with one query; the gauges are set from it.

        Raises ``StoreUnavailable`` or ``StoreRejected`` when PostgreSQL does not answer.
        """
        sources = list(self.settings.sources)
        windows = await freshness_windows(sources)
        with psycopg_errors():
            histories = await run_histories(self._db, [src.name for src in sources])
        now = self._clock.now()
        judged = [
            self.judge(src, histories.get(src.name, RunHistory()), window, now)
            for src, window in zip(sources, windows, strict=True)
        ]
        metrics.set_source_gauges({f.source: f.gauges() for f in judged})
        return judged

    async def sample_forever(self, every_s: float | None = None) -> None:
        """Evaluate every source every ``every_s`` (``FRESHNESS_SAMPLE_EVERY_S``) for the
        ``coleta.source.*`` gauges, until cancelled; returns at once when nothing reads the
        metrics. While PostgreSQL does not answer, the gauges keep their last values."""
        if not metrics.reading():
            return
        while True:
            try:
                await self.evaluate()
            except (StoreUnavailable, StoreRejected) as exc:
                log.warning("metrics.freshness_unavailable", extra={"error": str(exc)})
            await anyio.sleep(FRESHNESS_SAMPLE_EVERY_S if every_s is None else every_s)
