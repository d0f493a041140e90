"""Run events on ``<prefix>.raw.<source>``: what the fetcher saw, for the writer to persist.

One subject carries several kinds, told apart by the ``kind`` tag, so the writer sees a run's
events in the order the fetcher published them.
"""

from __future__ import annotations

from typing import Literal

from contracts._base import UtcDatetime, WireStruct
from contracts.commands import Trigger

__all__ = [
    "DeadLetter",
    "FetchFailed",
    "FetchStarted",
    "FetchUnchanged",
    "Granularity",
    "RawPayload",
    "RunEvent",
    "RunMissed",
]

#: ``page``: one row per response page; ``record``: one row per record of a page.
Granularity = Literal["page", "record"]


class _RunEventBase(WireStruct, frozen=True, kw_only=True, tag_field="kind"):
    run_id: str
    source: str
    trigger: Trigger = "schedule"
    scheduled_for: UtcDatetime
    #: Delivery attempt of the command that produced this event (1 = first).
    attempt: int = 1
    #: How many times the run was replayed from the dead-letter stream (0 = never).
    replay: int = 0


class FetchStarted(_RunEventBase, frozen=True, kw_only=True, tag="started"):
    """The run is fetching: published only when its outcome is not out within a second (a
    slow API, a long paginated run) or before its command is handed back for a retry, so
    ``coleta runs`` shows it ``fetching``. A quick run's outcome carries its times instead."""

    started_at: UtcDatetime
    queued_at: UtcDatetime | None = None


class RawPayload(_RunEventBase, frozen=True, kw_only=True, tag="page"):
    """One HTTP response body, exactly as received, with what is needed to store it."""

    page: int = 0
    #: True on the run's final page; the writer then marks the run ``stored``.
    last: bool = True
    fetched_at: UtcDatetime
    #: Request URL with credentials and key-bearing query parameters redacted.
    url: str
    method: str = "GET"
    status_code: int
    #: Response headers (credentials redacted).
    headers: dict[str, str] = {}
    content_type: str | None = None
    body: bytes
    elapsed_ms: float = 0.0
    #: Bytes of this run so far, this page included (idempotent: the writer keeps the maximum).
    run_bytes: int = 0
    #: Set when the body was too large for a NATS message: the body is in the object store
    #: (bucket ``<prefix>_bodies``) under this name, and ``body`` is empty.
    body_ref: str | None = None
    body_size: int | None = None
    #: How the writer splits the page into rows: ``page`` (one row) or ``record`` (one row per
    #: record at ``records_path``, or per line of a JSON-lines body). A page that cannot be
    #: split is stored whole.
    granularity: Granularity = "page"
    records_path: str | None = None
    #: Rows of this run so far, this page included (None: one row per page).
    run_rows: int | None = None
    #: On the last page of an incremental run: the new cursor, JSON-encoded (None: unchanged).
    cursor: str | None = None
    #: True on a one-request run: the writer remembers ``etag``, ``last_modified`` and
    #: ``body_sha256`` for the source's next conditional request.
    remember: bool = False
    etag: str | None = None
    last_modified: str | None = None
    body_sha256: str | None = None
    #: When the run was queued (its command's ``requested_at``) and this attempt started. A
    #: quick run publishes no ``FetchStarted``: its outcome carries both, and one write of
    #: its record has it whole. (Also on ``FetchFailed`` and ``FetchUnchanged``.)
    queued_at: UtcDatetime | None = None
    started_at: UtcDatetime | None = None


class FetchFailed(_RunEventBase, frozen=True, kw_only=True, tag="failed"):
    """The run failed for good: the writer marks it ``failed`` with this reason."""

    failed_at: UtcDatetime
    #: Stable machine-readable reason, e.g. ``http_status``, ``timeout``, ``connect``.
    error_code: str
    error: str
    http_status: int | None = None
    url: str | None = None
    queued_at: UtcDatetime | None = None
    started_at: UtcDatetime | None = None


class FetchUnchanged(_RunEventBase, frozen=True, kw_only=True, tag="unchanged"):
    """The API has nothing new (HTTP 304, or the same body as the last stored run): the
    writer records the run as ``unchanged`` and stores no row."""

    finished_at: UtcDatetime
    http_status: int | None = None
    #: Why, for people: ``not modified (HTTP 304)``, ``same body as the last stored run``.
    note: str = ""
    queued_at: UtcDatetime | None = None
    started_at: UtcDatetime | None = None


class RunMissed(_RunEventBase, frozen=True, kw_only=True, tag="missed"):
    """A slot that passed while no daemon ran and that catch-up does not run."""

    detected_at: UtcDatetime
    reason: str = ""


RunEvent = FetchStarted | RawPayload | FetchFailed | FetchUnchanged | RunMissed


class DeadLetter(WireStruct, frozen=True, kw_only=True):
    """On ``<prefix>.dlq.<source>.<error code>``: a message that could not be processed.

    ``original`` is the message exactly as it was received on ``subject``; replaying publishes it
    there again. A failed run's dead letter holds its collect command, so a replay runs it anew.
    An original too large to travel inside its dead letter (a NATS message holds 1 MiB by
    default, and JSON carries bytes as base64) is kept in the object store ``<prefix>_bodies``
    under ``original_ref`` instead, and ``original`` is empty.
    """

    source: str
    run_id: str | None = None
    subject: str
    original: bytes
    error_code: str
    error: str
    dead_at: UtcDatetime
    original_ref: str | None = None
    original_size: int | None = None
    #: The original's headers (trace context, message id), so a replay continues its trace.
    headers: dict[str, str] = {}
    #: Where the original was on its stream, and how often it had been delivered.
    stream: str | None = None
    stream_seq: int | None = None
    deliveries: int | None = None
