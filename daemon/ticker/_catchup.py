"""Start-up catch-up: slots that passed while no daemon ran are run now or recorded as missed.

The ticker asks PostgreSQL once, for all sources, for each source's newest recorded slot (any
trigger, any status, at or before now). Only the slots after it count as missed, within the
source's ``catchup_window`` and up to now inclusive; the first slot after now is the ticker's:

* ``latest`` queues the newest missed slot (trigger ``catchup``) and records the others as
  ``missed``; ``all`` queues every one, oldest first; ``none`` records them all as ``missed``.
* A source with no recorded run (a new source, a fresh database) catches up nothing: there is
  no record of when it was added, and a new source must not back-collect a week on first start.
* At most ``CATCHUP_LIMIT`` slots per source are queued or recorded, the newest ones: an
  every-second schedule down for a week has 604,800. Older ones are neither run nor recorded;
  a warning gives their number (exact for evenly spaced schedules, estimated otherwise).

Safe to repeat and to run on several replicas at once: a catch-up run has the run id a scheduled
run of its slot would have had, and a missed slot's event the id ``<run id>/missed``. Both are
``Nats-Msg-Id`` s, so JetStream drops repeats within ``duplicate_window_s``, and the writer's
upsert is idempotent (a later run of a missed slot replaces its ``missed`` record). Each
source's events go out oldest first, so a catch-up cut short by shutdown resumes on the next
start from the newest slot it recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio

from contracts import RunMissed
from daemon.errors import StoreUnavailable, classify
from daemon.ids import missed_id, run_id_for
from daemon.platform import metrics
from daemon.platform.bus import Bus
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.platform.retry import Backoff, Retrying, retry, transient
from daemon.settings import SourceConfig
from daemon.ticker._queue import queue_run

__all__ = ["CATCHUP_LIMIT", "CatchupPlan", "catch_up", "last_recorded_slots", "plan_catchup"]

log = get_logger("catchup")

#: Most slots one source may queue or record at start-up.
CATCHUP_LIMIT = 1000
#: Sources whose catch-up is published at once (each one's own events stay in order).
_CONCURRENT_SOURCES = 8
#: A publish the bus refused is tried again every 2 s.
_PUBLISH_BACKOFF = Backoff(first_s=2.0, cap_s=2.0)
#: Reading the run history while PostgreSQL is unreachable: again after 1 s, doubling to 30 s.
_QUERY_BACKOFF = Backoff(first_s=1.0, cap_s=30.0)

# One index probe per source on (source, scheduled_for DESC). A slot after ``now`` (a manual
# run dated in the future) must not hide the gap before it.
LAST_RECORDED = """
SELECT s.name, (
    SELECT max(r.scheduled_for) FROM collection_runs r
    WHERE r.source = s.name AND r.scheduled_for <= %(now)s
)
FROM unnest(%(names)s::text[]) AS s(name)
"""


@dataclass(frozen=True, slots=True)
class CatchupPlan:
    """What catch-up does for one source: slots to queue and slots to record, oldest first."""

    source: str
    run: tuple[datetime, ...] = ()
    missed: tuple[datetime, ...] = ()
    #: Missed slots past ``CATCHUP_LIMIT``, left alone (estimated for uneven schedules).
    skipped: int = 0
    #: The newest recorded slot; None for a source never run, which catches up nothing.
    last_recorded: datetime | None = None

    def steps(self) -> list[tuple[datetime, bool]]:
        """``(slot, queue it?)`` in time order: the order they are published in."""
        return sorted([(slot, True) for slot in self.run] + [(s, False) for s in self.missed])


def plan_catchup(
    source: SourceConfig,
    last_recorded: datetime | None,
    now: datetime,
    *,
    limit: int = CATCHUP_LIMIT,
) -> CatchupPlan:
    """The slots in ``(max(last_recorded, now - window), now]`` and what to do with each.

    Walks back from ``now`` so the work is bounded by ``limit``, not by the window.
    """
    if last_recorded is None:
        return CatchupPlan(source=source.name)
    cron = source.cron
    since = max(last_recorded, now - timedelta(seconds=source.catchup_window_s))
    newest_first: list[datetime] = []
    slot = cron.prev_at_or_before(now)
    while slot > since and len(newest_first) < limit:
        newest_first.append(slot)
        slot = cron.prev_before(slot)
    skipped = 0
    if slot > since:
        # Counting them one by one could take minutes: extrapolate the spacing seen so far.
        spacing = (newest_first[0] - slot) / len(newest_first)
        skipped = max(1, math.ceil((slot - since) / spacing))
    slots = tuple(reversed(newest_first))
    run: tuple[datetime, ...] = ()
    missed: tuple[datetime, ...] = ()
    if source.catchup == "all":
        run = slots
    elif source.catchup == "latest":
        run, missed = slots[-1:], slots[:-1]
    else:
        missed = slots
    return CatchupPlan(
        source=source.name,
        run=run,
        missed=missed,
        skipped=skipped,
        last_recorded=last_recorded,
    )


async def last_recorded_slots(
    db: Database, names: Sequence[str], now: datetime
) -> dict[str, datetime]:
    """Each source's newest recorded slot at or before ``now``; sources never run are absent."""
    async with db.pool.connection() as conn:
        cur = await conn.execute(LAST_RECORDED, {"names": list(names), "now": now})
        return {name: slot.astimezone(UTC) for name, slot in await cur.fetchall() if slot}


async def catch_up(
    bus: Bus, db: Database, sources: Sequence[SourceConfig], now: datetime
) -> dict[str, CatchupPlan]:
    """Queue and record every source's missed slots as of ``now``; returns what was done.

    Waits for PostgreSQL and the bus when they are unreachable rather than give up: a slot
    neither run nor recorded would be lost for good once the next scheduled run lands.
    """
    last = await _read_history(db, [source.name for source in sources], now)
    # Walking cron schedules is pure CPU (~0.2 ms a slot): keep it off the event loop.
    plans = await anyio.to_thread.run_sync(
        lambda: [plan_catchup(source, last.get(source.name), now) for source in sources],
        abandon_on_cancel=True,
    )
    limiter = anyio.CapacityLimiter(_CONCURRENT_SOURCES)
    async with anyio.create_task_group() as tg:
        for source, plan in zip(sources, plans, strict=True):
            tg.start_soon(_apply, bus, source, plan, now, limiter, name=f"catchup-{source.name}")
    return {plan.source: plan for plan in plans}


async def _read_history(db: Database, names: list[str], now: datetime) -> dict[str, datetime]:
    """The runs recorded so far; retried while PostgreSQL is unavailable. Any other answer
    (a bug, a database refusing the query) skips catch-up rather than stopping the ticker."""

    def retrying(failed: Retrying) -> None:
        log.warning(
            "catchup.history_unavailable",
            extra={"error": str(classify(failed.error)), "retry_in_s": failed.delay_s},
        )

    try:
        return await retry(
            lambda: last_recorded_slots(db, names, now),
            retry_on=lambda exc: isinstance(classify(exc), StoreUnavailable),
            backoff=_QUERY_BACKOFF,
            on_retry=retrying,
        )
    except Exception as exc:
        log.error("catchup.skipped", exc_info=exc, extra={"error": str(classify(exc))})
        return {}


async def _apply(
    bus: Bus,
    source: SourceConfig,
    plan: CatchupPlan,
    now: datetime,
    limiter: anyio.CapacityLimiter,
) -> None:
    if plan.skipped:
        log.warning(
            "catchup.capped",
            extra={
                "source": source.name,
                "limit": CATCHUP_LIMIT,
                "skipped": plan.skipped,
                "oldest_kept": plan.steps()[0][0].isoformat(),
            },
        )
    async with limiter:
        for slot, queue in plan.steps():
            await _publish_retrying(bus, source, slot, now, queue=queue)
    log.info(
        "catchup.done",
        extra={
            "source": source.name,
            "mode": source.catchup,
            "queued": len(plan.run),
            "missed": len(plan.missed),
            "skipped": plan.skipped,
            "last_recorded": plan.last_recorded.isoformat() if plan.last_recorded else None,
        },
    )


async def _publish_retrying(
    bus: Bus, source: SourceConfig, slot: datetime, now: datetime, *, queue: bool
) -> None:
    run_id = run_id_for(source.name, slot)

    async def publish() -> None:
        if queue:
            await queue_run(bus, source, slot, run_id=run_id, trigger="catchup", now=now)
            metrics.record_lateness(source.name, (now - slot).total_seconds(), trigger="catchup")
        else:
            await _record_missed(bus, source, slot, run_id, now)

    def retrying(failed: Retrying) -> None:
        log.error(
            "catchup.publish_failed",
            extra={"source": source.name, "run_id": run_id, "error": str(failed.error)},
        )

    # The bus is down: both messages are de-duplicated by id, so retrying is safe.
    await retry(
        publish,
        retry_on=transient,
        backoff=_PUBLISH_BACKOFF,
        on_retry=retrying,
    )


async def _record_missed(
    bus: Bus, source: SourceConfig, slot: datetime, run_id: str, now: datetime
) -> None:
    # Down, or the source was disabled: either way no ticker published this slot.
    reason = f"not run at its time (no daemon running or source disabled); catchup={source.catchup}"
    event = RunMissed(
        run_id=run_id,
        source=source.name,
        trigger="schedule",
        scheduled_for=slot,
        attempt=0,  # never attempted: the run's record shows 0 attempts
        detected_at=now,
        reason=reason,
    )
    await bus.publish(
        bus.subjects.raw(source.name),
        event,
        msg_id=missed_id(run_id),
        source=source.name,
        run_id=run_id,
    )
