"""The run events the fetcher publishes: their common envelope, message ids and pages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypedDict

import msgspec

from contracts import CollectCommand, RawPayload, Trigger
from daemon._http import Fetched
from daemon._progress import Progress, records_path
from daemon.settings import SourceConfig

__all__ = ["Envelope", "envelope", "msg_id", "page_payload"]


class Envelope(TypedDict):
    """The fields every run event repeats from its command (``_RunEventBase``)."""

    run_id: str
    source: str
    trigger: Trigger
    scheduled_for: datetime
    attempt: int
    replay: int


def envelope(command: CollectCommand, attempt: int) -> Envelope:
    """The run event fields of ``command``'s delivery ``attempt``: ``Event(**envelope(…))``."""
    return Envelope(
        run_id=command.run_id,
        source=command.source,
        trigger=command.trigger,
        scheduled_for=command.scheduled_for,
        attempt=attempt,
        replay=command.replay,
    )


def msg_id(command: CollectCommand, event: str) -> str:
    """The ``Nats-Msg-Id`` of one event of the run: unique per run, replay and ``event``."""
    return f"{command.run_id}/r{command.replay}/{event}"


def page_payload(
    command: CollectCommand,
    attempt: int,
    fetched: Fetched,
    *,
    source: SourceConfig,
    progress: Progress,
    last: bool,
    body_sha256: str | None,
) -> RawPayload:
    """Page ``progress.page`` of the run, with the hints the writer needs to store it."""
    one_request = source.pagination is None
    headers = {k.lower(): v for k, v in fetched.headers.items()}
    return RawPayload(
        **envelope(command, attempt),
        page=progress.page,
        last=last,
        fetched_at=datetime.now(UTC),
        url=fetched.url,
        status_code=fetched.status_code,
        headers=fetched.headers,
        content_type=fetched.content_type,
        body=fetched.body,
        elapsed_ms=fetched.elapsed_ms,
        run_bytes=progress.run_bytes,
        granularity=source.granularity,
        records_path=records_path(source),
        run_rows=progress.run_rows,
        cursor=msgspec.json.encode(progress.cursor).decode()
        if last and progress.cursor is not None
        else None,
        remember=one_request,
        etag=headers.get("etag") if one_request else None,
        last_modified=headers.get("last-modified") if one_request else None,
        body_sha256=body_sha256,
    )
