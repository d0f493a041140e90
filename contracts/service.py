"""Requests and replies of the request-reply service (``<prefix>.status`` …).

Requests are lenient about what they accept (a bare source name is a trigger request), replies
are strict about what they send. Errors travel as ``ErrorReply`` bodies together with the NATS
micro ``Nats-Service-Error`` / ``Nats-Service-Error-Code`` headers.

Every reply fits in one NATS message. Lists that can grow past it come in pages: a reply that
stops short carries ``next``, a cursor to send back as the request's ``after`` for the
following page; ``next`` is null on the last page. Long error texts in replies are cut to
``REPLY_TEXT_LIMIT`` characters, saying so.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import msgspec

from contracts._base import UtcDatetime, WireStruct
from contracts.commands import Trigger

__all__ = [
    "BACKFILL_LIMIT",
    "HEALTH_SOURCES_LISTED",
    "REPLY_TEXT_LIMIT",
    "STRIP_DAYS",
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
    "StatusRequest",
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


#: Longest error (or note) text a reply carries; a longer one is cut and ends with
#: ``… [truncated: 12,345 characters in all]``.
REPLY_TEXT_LIMIT = 1000


class RunsRequest(WireStruct, frozen=True, kw_only=True):
    """Recent runs, newest first: at most ``limit`` in this reply, after the run ``after``."""

    source: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    #: The ``next`` of the previous page (the run id it ended with).
    after: str | None = None


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
    #: More runs follow: ask again with ``after`` set to this (null: none follow).
    next: str | None = None


class ComponentHealth(WireStruct, frozen=True, kw_only=True):
    ok: bool
    detail: str = ""


#: Days of a source's runs a status reply shows (``SourceStatus.days``), today (UTC) included.
STRIP_DAYS = 30

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
    #: Seconds since the source's last stored (or unchanged) run finished; for a source that
    #: never stored one, since it was first seen (its first recorded run, or the daemon's
    #: start with it in the config, whichever is earlier). Null when not known (the database
    #: did not answer).
    freshness_age_s: float | None = None
    #: How long the source may go without a stored run (its ``freshness_s``, or the default
    #: from its schedule); null for a schedule that never fires.
    freshness_s: float | None = None
    #: Past ``freshness_s`` (enabled sources only).
    late: bool = False
    #: ``consecutive_failures`` reached ``failures_before_degraded`` (enabled sources only).
    failing: bool = False


class StatusRequest(WireStruct, frozen=True, kw_only=True):
    """Every source's status (or one ``source``'s), in config order, a page at a time."""

    source: str | None = None
    #: The ``next`` of the previous page (the source name it ended with).
    after: str | None = None


class StatusReply(WireStruct, frozen=True, kw_only=True):
    version: str
    uptime_s: float
    bus: ComponentHealth
    database: ComponentHealth
    sources: list[SourceStatus]
    #: More sources follow: ask again with ``after`` set to this (null: none follow).
    next: str | None = None


#: Most source names a health reply lists in ``late`` and in ``failing`` (``coleta status``
#: shows them all).
HEALTH_SOURCES_LISTED = 100


class HealthReply(WireStruct, frozen=True, kw_only=True):
    status: Literal["ok", "degraded"]
    #: Why the daemon is degraded; empty when ok.
    reason: str = ""
    #: ``bus``, ``database``, every JetStream stream the pipeline needs, by name
    #: (``KV_<bucket>`` and ``OBJ_<bucket>`` for its buckets), every durable consumer
    #: (``<stream>/<consumer>``), and ``sources``: whether every enabled source stored a run
    #: within its freshness window and is not failing (left out when the database is down).
    checks: dict[str, ComponentHealth] = {}
    #: Enabled sources past their freshness window, in config order (the first
    #: ``HEALTH_SOURCES_LISTED``).
    late: list[str] = []
    #: Enabled sources whose last ``failures_before_degraded`` runs failed, in config order
    #: (the first ``HEALTH_SOURCES_LISTED``).
    failing: list[str] = []


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
    #: Stable code: ``bad_request`` (400), ``unknown_source`` (404), ``too_large`` (413),
    #: ``unavailable`` (503), ``internal`` (500).
    code: str
    message: str


class ErrorReply(WireStruct, frozen=True, kw_only=True):
    error: ErrorDetail
