"""Backfill: one run per scheduled slot of a date range, oldest first, trigger ``backfill``.

The range is inclusive. A bound is a date (``2026-01-31``: the whole day, midnight to
midnight, in the source's timezone) or an ISO 8601 datetime (without an offset it is read in
the source's timezone). At most ``BACKFILL_LIMIT`` slots per request.

Per slot, from the runs recorded for it (any trigger, by ``scheduled_for``):

* stored (or ``unchanged``), or queued / being fetched right now → skipped, unless ``force``;
* nothing recorded, or only ``missed`` → queued under the slot's own run id (``<source>@<slot>``,
  as the ticker would have), so a tick or catch-up of the same slot is the same run;
* anything else (failed; or anything, with ``force``) → queued under a fresh id
  ``<source>@<slot>-backfill-<n>``, n one more than any earlier backfill of the slot. A fresh id
  is needed because run ids are ``Nats-Msg-Id`` s: JetStream would drop a command (and its
  events) reusing one within ``duplicate_window_s``. The same request made twice at once
  computes the same ids, so JetStream still keeps it to one run per slot.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from contracts import BACKFILL_LIMIT
from daemon.ids import backfill_number, backfill_run_id, run_id_for
from daemon.platform.bus import Bus
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.settings import SourceConfig
from daemon.ticker import queue_run

__all__ = ["BackfillPlan", "parse_range", "plan_backfill", "queue_backfill", "run_progress"]

log = get_logger("backfill")

#: Statuses that make a slot done: it is skipped unless forced.
_DONE = ("stored", "unchanged")
#: Statuses of a run in progress: the slot is skipped unless forced.
_RUNNING = ("queued", "fetching")

SLOT_RUNS = """
SELECT scheduled_for, run_id, status FROM collection_runs
WHERE source = %(source)s AND scheduled_for >= %(start)s AND scheduled_for <= %(end)s
"""

RUN_PROGRESS = """
SELECT status, count(*) FROM collection_runs WHERE run_id = ANY(%(run_ids)s::text[])
GROUP BY status
"""


#: Longer than any date or ISO 8601 datetime (``2026-01-31T10:00:00.000000+05:30`` is 32).
_BOUND_CHARS = 64


def _bound(name: str, text: str, tz: ZoneInfo, *, end: bool) -> datetime:
    text = text.strip()
    if len(text) > _BOUND_CHARS:  # not echoed: the error goes back in a NATS reply
        raise ValueError(
            f"{name}: not a date (YYYY-MM-DD) or an ISO 8601 datetime ({len(text):,} characters)"
        )
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = date.fromisoformat(text)
            if end:  # the whole day: up to the last instant before the next midnight
                after = datetime.combine(day + timedelta(days=1), time(), tz)
                return after.astimezone(UTC) - timedelta(microseconds=1)
            return datetime.combine(day, time(), tz).astimezone(UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{name}: {text!r} is not a date (YYYY-MM-DD) or an ISO 8601 datetime"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.astimezone(UTC)


def parse_range(source: SourceConfig, start: str, end: str) -> tuple[datetime, datetime]:
    """``(first, last)`` instants, UTC, of an inclusive range; ValueError naming the bound."""
    tz = source.cron.tz
    first = _bound("start", start, tz, end=False)
    last = _bound("end", end, tz, end=True)
    if last < first:
        raise ValueError(f"end: {end!r} is before start {start!r}")
    return first, last


def slots_between(source: SourceConfig, first: datetime, last: datetime) -> list[datetime]:
    """Every slot in ``[first, last]``, oldest first; ValueError past ``BACKFILL_LIMIT``."""
    slots: list[datetime] = []
    for slot in source.cron.between(first, last):
        if len(slots) == BACKFILL_LIMIT:
            raise ValueError(
                f"the range holds more than {BACKFILL_LIMIT} slots of {source.schedule!r};"
                " split it into smaller ranges"
            )
        slots.append(slot)
    return slots


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    source: str
    first: datetime
    last: datetime
    #: ``(slot, run id)`` to queue, oldest first.
    run: list[tuple[datetime, str]] = field(default_factory=list)
    #: ``(slot, run id of the run that makes it skipped)``.
    skipped: list[tuple[datetime, str]] = field(default_factory=list)


def plan_backfill(
    source: SourceConfig,
    slots: Sequence[datetime],
    recorded: Sequence[tuple[datetime, str, str]],
    *,
    first: datetime,
    last: datetime,
    force: bool = False,
) -> BackfillPlan:
    """Decide each slot from the runs ``recorded`` for it (``(scheduled_for, run_id, status)``)."""
    by_slot: dict[datetime, list[tuple[str, str]]] = defaultdict(list)
    for scheduled_for, run_id, status in recorded:
        by_slot[scheduled_for.astimezone(UTC)].append((run_id, status))
    plan = BackfillPlan(source=source.name, first=first, last=last)
    for slot in slots:
        runs = by_slot.get(slot, [])
        blocking = [run_id for run_id, status in runs if status in _DONE + _RUNNING]
        if blocking and not force:
            plan.skipped.append((slot, blocking[0]))
            continue
        base = run_id_for(source.name, slot)
        if all(status == "missed" for run_id, status in runs if run_id == base):
            # The slot's own id was never published (a missed slot records ``<id>/missed``).
            plan.run.append((slot, base))
            continue
        earlier = [n for run_id, _ in runs if (n := backfill_number(base, run_id)) is not None]
        plan.run.append((slot, backfill_run_id(base, max(earlier, default=0) + 1)))
    return plan


async def slot_runs(
    db: Database, source: str, first: datetime, last: datetime
) -> list[tuple[datetime, str, str]]:
    async with db.pool.connection() as conn, conn.cursor() as cur:
        await cur.execute(SLOT_RUNS, {"source": source, "start": first, "end": last})
        return [(row[0], row[1], row[2]) for row in await cur.fetchall()]


async def queue_backfill(
    bus: Bus, source: SourceConfig, plan: BackfillPlan, now: datetime
) -> list[str]:
    """Publish the plan's runs, oldest first; the run ids queued."""
    queued: list[str] = []
    for slot, run_id in plan.run:
        await queue_run(bus, source, slot, run_id=run_id, trigger="backfill", now=now)
        queued.append(run_id)
    log.info(
        "backfill.queued",
        extra={
            "source": source.name,
            "queued": len(queued),
            "skipped": len(plan.skipped),
            "start": plan.first.isoformat(),
            "end": plan.last.isoformat(),
        },
    )
    return queued


async def run_progress(db: Database, run_ids: Sequence[str]) -> dict[str, int]:
    """Runs per status; runs not recorded yet count as ``queued``."""
    async with db.pool.connection() as conn, conn.cursor() as cur:
        await cur.execute(RUN_PROGRESS, {"run_ids": list(run_ids)})
        counts = {str(status): int(n) for status, n in await cur.fetchall()}
    unrecorded = len(set(run_ids)) - sum(counts.values())
    if unrecorded > 0:
        counts["queued"] = counts.get("queued", 0) + unrecorded
    return counts
