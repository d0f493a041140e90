"""The run events the fetcher publishes on ``<prefix>.raw.<source>``, and where a failed run's
command goes.

Every event repeats its command's envelope (run id, source, slot, attempt, replay) and carries
its own message id (``daemon.ids``), so a re-publish is a no-op within the duplicate window,
and the context of the fetcher's span of the run (no span of its own: one span per hop). A
page's body too large for a NATS message goes to the object store first, under the page's id.
A run that fails for good keeps its command in the dead-letter stream (the office,
``platform.dead_letters``), then records the failure; a message that is not a command at all is
poison.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypedDict

import msgspec

from contracts import (
    CollectCommand,
    FetchFailed,
    FetchStarted,
    FetchUnchanged,
    RawPayload,
    Trigger,
    encode,
    source_of,
)
from daemon.errors import PoisonMessage
from daemon.fetcher._progress import Progress, records_path
from daemon.fetcher._send import Fetched
from daemon.ids import MAX_ECHO, event_id, page_id
from daemon.platform.bus import Bus, Msg, Pending
from daemon.platform.dead_letters import MAX_DELIVERIES, MAX_ERROR_TEXT, DeadLetters, Exhausted
from daemon.platform.logs import get_logger
from daemon.platform.redact import redact_headers, redact_text, redact_url
from daemon.settings import SourceConfig

__all__ = ["Envelope", "RunEvents", "decode_command", "envelope", "page_payload"]

log = get_logger("fetcher")

_decode_command = msgspec.json.Decoder(CollectCommand).decode
#: Room kept for the payload's JSON envelope and headers within the NATS max payload.
_ENVELOPE_BYTES = 16 * 1024
#: Room kept for a message's NATS headers (message id, trace context).
_HEADER_ROOM = 1024


def decode_command(msg_or_data: Msg | bytes, subject: str = "") -> CollectCommand:
    """A collect command, or ``PoisonMessage``: it can never become valid, never retry it."""
    data = msg_or_data if isinstance(msg_or_data, bytes) else msg_or_data.data
    try:
        return _decode_command(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise PoisonMessage(f"not a collect command: {str(exc)[:500]}", subject=subject) from exc


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


def page_payload(
    command: CollectCommand,
    attempt: int,
    fetched: Fetched,
    *,
    source: SourceConfig,
    progress: Progress,
    last: bool,
    body_sha256: str | None,
    had_state: bool = False,
    started_at: datetime | None = None,
) -> RawPayload:
    """Page ``progress.page`` of the run, with the hints the writer needs to store it.

    A one-request run's validators are remembered (``remember``) only when there is something
    to remember — the response's ``ETag`` or ``Last-Modified``, its body for
    ``skip_unchanged`` — or something to replace (``had_state``: the source's last stored
    state): most APIs send neither, and their runs then cost no ``source_state`` write.
    """
    # Published and stored: a secret the API echoes (a Link to the next page) is masked.
    sent = redact_headers(fetched.headers)
    headers = {k.lower(): v for k, v in sent.items()}
    one_request = source.pagination is None and (
        "etag" in headers or "last-modified" in headers or source.skip_unchanged or had_state
    )
    return RawPayload(
        **envelope(command, attempt),
        page=progress.page,
        last=last,
        fetched_at=datetime.now(UTC),
        url=redact_url(fetched.url),
        status_code=fetched.status_code,
        headers=sent,
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
        queued_at=command.requested_at,
        started_at=started_at,
    )


class RunEvents:
    """Publishes a run's events; hands failed runs and poison to the dead-letter office."""

    def __init__(self, bus: Bus, dead_letters: DeadLetters) -> None:
        self._bus = bus
        self._dead = dead_letters

    async def started(self, command: CollectCommand, attempt: int, started_at: datetime) -> None:
        """The run is fetching (a slow one, or one handed back for a retry)."""
        event = FetchStarted(
            **envelope(command, attempt), started_at=started_at, queued_at=command.requested_at
        )
        await self._publish(command, event, f"started/{attempt}")

    async def unchanged(
        self,
        command: CollectCommand,
        attempt: int,
        http_status: int,
        note: str,
        started_at: datetime | None = None,
    ) -> None:
        """The API has nothing new: the run ends ``unchanged``, storing no row."""
        log.debug(
            "fetch.unchanged",
            extra={"source": command.source, "run_id": command.run_id, "note": note},
        )
        event = FetchUnchanged(
            **envelope(command, attempt),
            finished_at=datetime.now(UTC),
            http_status=http_status,
            note=note,
            queued_at=command.requested_at,
            started_at=started_at,
        )
        await self._publish(command, event, "unchanged")

    def inline_bytes(self) -> int:
        """The largest body that travels in its payload message: JSON carries bytes as base64,
        4 bytes on the wire for every 3 of the body. Larger ones go to the object store, and
        ``send`` spools them to disk as they arrive."""
        return (self._bus.max_payload - _ENVELOPE_BYTES) * 3 // 4

    async def send_page(
        self, command: CollectCommand, payload: RawPayload, fetched: Fetched
    ) -> Pending:
        """Send a page (confirm it later); a body too large for one NATS message goes to the
        object store first, from its spool file when it has one (never whole in memory)."""
        message_id = page_id(command, payload.attempt, payload.page)
        encoded: bytes | None = None
        if fetched.spool is None and fetched.size <= self.inline_bytes():
            encoded = encode(payload)
            # The rest of the page (headers up to 100 KiB, a long URL) may not fit either.
            if len(encoded) + _HEADER_ROOM > self._bus.max_payload:
                encoded = None
        if encoded is None:
            body = fetched.spool if fetched.spool is not None else fetched.body
            await self._bus.put_body(message_id, body)
            encoded = encode(
                msgspec.structs.replace(
                    payload, body=b"", body_ref=message_id, body_size=fetched.size
                )
            )
        return await self._bus.send(
            self._bus.subjects.raw(command.source),
            encoded,
            msg_id=message_id,
            source=command.source,
            run_id=command.run_id,
            traced=False,
        )

    async def fail(
        self,
        msg: Msg,
        command: CollectCommand,
        attempt: int,
        code: str,
        error: str,
        http_status: int | None = None,
        url: str | None = None,
        started_at: datetime | None = None,
    ) -> None:
        """The run fails for good: its command goes to the dead-letter stream first (so
        ``coleta.dlq.replay`` can run it again), then the failure is recorded and the command
        acked. While the dead-letter stream refuses, the office holds the command."""
        error, url = redact_text(error), url and redact_url(url)  # stored
        log.error(
            "fetch.failed",
            extra={
                "source": command.source,
                "run_id": command.run_id,
                "attempt": attempt,
                "http_status": http_status,
                "error_code": code,
                "error": error,
            },
        )
        event = FetchFailed(
            **envelope(command, attempt),
            failed_at=datetime.now(UTC),
            error_code=code,
            error=error[:MAX_ERROR_TEXT],
            http_status=http_status,
            url=url,
            queued_at=command.requested_at,
            started_at=started_at,
        )

        async def record() -> None:
            await self._publish(command, event, "failed")

        await self._dead.dispose(
            msg,
            source=command.source,
            run_id=command.run_id,
            code=code,
            error=error,
            msg_id=event_id(command, "dlq"),
            then=record,
            settle="ack",
            stage="fetcher",
        )

    async def poison(self, msg: Msg, error: PoisonMessage) -> None:
        """A message that is not a command: kept in the dead-letter stream, never retried."""
        log.error("fetch.poison", extra={"subject": msg.subject[:MAX_ECHO], "error": str(error)})
        await self._dead.dispose(
            msg,
            source=source_of(msg.subject),
            run_id=None,
            code=error.code,
            error=str(error),
            stage="fetcher",
        )

    async def exhausted(self, exhausted: Exhausted) -> None:
        """A command exhausted its deliveries (the daemon died or hung with it each time):
        its run ends failed. Its dead letter is stored already."""
        try:
            command = decode_command(exhausted.original.data)
        except PoisonMessage:
            return  # nothing to record
        attempt = command.attempts_done + (exhausted.original.deliveries or 1)
        event = FetchFailed(
            **envelope(command, attempt),
            failed_at=datetime.now(UTC),
            error_code=MAX_DELIVERIES,
            error=f"delivered {exhausted.original.deliveries} times without finishing",
        )
        await self._publish(command, event, "failed")

    async def _publish(self, command: CollectCommand, event: msgspec.Struct, kind: str) -> None:
        """Publish one event of the run and wait for JetStream to take it."""
        await self._bus.publish(
            self._bus.subjects.raw(command.source),
            event,
            msg_id=event_id(command, kind),
            source=command.source,
            run_id=command.run_id,
            traced=False,
        )
