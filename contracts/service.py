"""Requests and replies of the request-reply service (``<prefix>.status`` …).

Requests are lenient about what they accept (a bare source name is a trigger request), replies
are strict about what they send. Errors travel as ``ErrorReply`` bodies together with the NATS
micro ``Nats-Service-Error`` / ``Nats-Service-Error-Code`` headers.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import msgspec

from contracts._base import UtcDatetime, WireStruct
from contracts.commands import Trigger

__all__ = [
    "BACKFILL_LIMIT",
    "BackfillReply",
    "BackfillRequest",
    "ComponentHealth",
    "DayMark",
    "DayOutcome",
    "DlqReplayReply",
    "DlqReplayRequest",
    "ErrorDetail",
    "ErrorReply",
    "HealthReply",
    "RunInfo",
    "RunProgressReply",
    "RunProgressRequest",
    "RunStatus",
    "RunsReply",
    "RunsRequest",
    "SourceStatus",
    "StatusReply",
    "TriggerReply",
    "TriggerRequest",
]

#: Life of a run: queued → fetching → stored | failed; a slot skipped after downtime is missed.
RunStatus = Literal["queued", "fetching", "stored", "unchanged", "failed", "missed"]


class TriggerRequest(WireStruct, frozen=True, kw_only=True):
    """Run ``source`` now; ``scheduled_for`` sets the slot the run is for (default: now)."""

    source: str
    scheduled_for: UtcDatetime | None = None


class TriggerReply(WireStruct, frozen=True, kw_only=True):
    run_id: str
    source: str
    scheduled_for: UtcDatetime


class RunsRequest(WireStruct, frozen=True, kw_only=True):
    source: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20


class RunInfo(WireStruct, frozen=True, kw_only=True):
    run_id: str
    source: str
    trigger: Trigger
    scheduled_for: UtcDatetime
    status: RunStatus
    attempts: int = 0
    pages: int = 0
    rows: int = 0
    bytes: int = 0
    http_status: int | None = None
    error: str | None = None
    trace_id: str | None = None
    queued_at: UtcDatetime | None = None
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    #: Why a run is ``unchanged`` (``not modified (HTTP 304)`` …).
    note: str | None = None


class RunsReply(WireStruct, frozen=True, kw_only=True):
    runs: list[RunInfo]


class ComponentHealth(WireStruct, frozen=True, kw_only=True):
    ok: bool
    detail: str = ""


#: The best outcome of a UTC day's runs, best first: ``stored`` (rows stored), ``unchanged``
#: (stored, nothing new), ``running`` (queued or fetching), ``failed``, ``missed``.
DayOutcome = Literal["stored", "unchanged", "running", "failed", "missed"]


class DayMark(WireStruct, frozen=True, kw_only=True):
    """One UTC day (of ``scheduled_for``) of a source's runs."""

    day: date
    outcome: DayOutcome


class SourceStatus(WireStruct, frozen=True, kw_only=True):
    name: str
    schedule: str
    timezone: str
    next_run: UtcDatetime | None = None
    last_run: RunInfo | None = None
    consecutive_failures: int = 0
    rows: int = 0
    #: Messages of this source waiting in the dead-letter stream.
    dead_letters: int = 0
    #: The last 30 UTC days that had runs, oldest first; days without runs are left out.
    days: list[DayMark] = []


class StatusReply(WireStruct, frozen=True, kw_only=True):
    version: str
    uptime_s: float
    bus: ComponentHealth
    database: ComponentHealth
    sources: list[SourceStatus]


class HealthReply(WireStruct, frozen=True, kw_only=True):
    status: Literal["ok", "degraded"]
    #: Why the daemon is degraded; empty when ok.
    reason: str = ""
    checks: dict[str, ComponentHealth] = {}


class DlqReplayRequest(WireStruct, frozen=True, kw_only=True):
    """Re-queue dead letters: all of them, one source's, or one run's."""

    source: str | None = None
    run_id: str | None = None


class DlqReplayReply(WireStruct, frozen=True, kw_only=True):
    replayed: int
    run_ids: list[str] = []


#: Most slots one backfill request may queue (and most run ids one progress request may name).
BACKFILL_LIMIT = 10_000


class BackfillRequest(WireStruct, frozen=True, kw_only=True):
    """Queue one run per scheduled slot of ``source`` from ``start`` to ``end``, inclusive.

    ``start`` and ``end`` are dates (``2026-01-31``: the whole day in the source's timezone) or
    ISO 8601 datetimes (without an offset: in the source's timezone). Slots already stored are
    skipped unless ``force``.
    """

    source: str
    start: str
    end: str
    force: bool = False


class BackfillReply(WireStruct, frozen=True, kw_only=True):
    source: str
    #: The range as understood: first and last instant, UTC.
    start: UtcDatetime
    end: UtcDatetime
    #: Scheduled slots in the range; each was queued or skipped.
    slots: int
    queued: int
    skipped: int
    #: Run ids queued, oldest slot first.
    run_ids: list[str] = []
    #: Run ids already stored for the skipped slots.
    skipped_run_ids: list[str] = []


class RunProgressRequest(WireStruct, frozen=True, kw_only=True):
    """How far these runs are (``coleta backfill`` polls this)."""

    run_ids: Annotated[list[str], msgspec.Meta(max_length=BACKFILL_LIMIT)]


class RunProgressReply(WireStruct, frozen=True, kw_only=True):
    total: int
    #: Runs per status; runs not recorded yet count as ``queued``.
    counts: dict[str, int] = {}


class ErrorDetail(WireStruct, frozen=True, kw_only=True):
    #: Stable code: ``bad_request``, ``unknown_source``, ``unavailable``, ``internal``.
    code: str
    message: str


class ErrorReply(WireStruct, frozen=True, kw_only=True):
    error: ErrorDetail
