"""A fetch's messages on their way to PostgreSQL: decoded into items, grouped into
transactions, kept alive while the writer holds them, and settled once each.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

from contracts import (
    CollectCommand,
    FetchFailed,
    FetchStarted,
    FetchUnchanged,
    RawPayload,
    RunEvent,
    RunMissed,
)
from daemon.errors import PoisonMessage, classify
from daemon.platform.bus import Msg, message_trace_id, settle
from daemon.platform.logs import get_logger
from daemon.platform.spans import Span
from daemon.writer._rows import LargeRow
from daemon.writer._runs import RunRow, StateRow, run_row, state_row

__all__ = ["Batch", "HandBack", "Item", "item_for_command", "item_for_event", "transactions"]

log = get_logger("writer")

_decode_event = msgspec.json.Decoder(RunEvent).decode
_decode_command = msgspec.json.Decoder(CollectCommand).decode


def _decoded(msg: Msg, decode: Callable[[bytes], Any]) -> Any:
    """``decode(msg.data)``, or ``PoisonMessage``: a message that is not a valid contract
    (undecodable, the wrong type, nested too deep) can never become one."""
    try:
        return decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as exc:
        found = classify(exc)
        raise PoisonMessage(f"not a valid message: {found}", subject=msg.subject) from exc


@dataclass(slots=True)
class Item:
    """One decoded message with what the batch will write for it."""

    msg: Msg
    data_rows: list[tuple[Any, ...]]
    run_row: RunRow
    span: Span | None = None
    #: A body in the object store, read before the write and deleted after the commit.
    body_ref: str | None = None
    #: The page whose rows are built before its transaction (from ``body_ref`` if set).
    payload: RawPayload | None = None
    #: The source's state after this run (its last page only).
    state_row: StateRow | None = None
    #: The page stored whole from ``body_ref``'s temporary file (``body_file``).
    large_rows: list[LargeRow] = field(default_factory=list)
    body_file: io.BufferedIOBase | None = None
    #: Bytes the message holds: its own, and its body's in the object store.
    size: int = 0
    #: Whether writing it is a span of its own in the run's trace (a run event: the writer's
    #: hop); a command recorded as queued is only linked from its batch's span.
    traced: bool = True

    def close(self) -> None:
        """Remove the body's temporary file, if any (idempotent)."""
        if self.body_file is not None:
            self.body_file.close()


def item_for_command(msg: Msg) -> Item:
    cmd: CollectCommand = _decoded(msg, _decode_command)
    run = run_row(
        run_id=cmd.run_id,
        source=cmd.source,
        trigger=cmd.trigger,
        scheduled_for=cmd.scheduled_for,
        status="queued",
        trace_id=message_trace_id(msg.headers),
        queued_at=cmd.requested_at,
        replay=cmd.replay,
    )
    return Item(msg, [], run, traced=False)


def item_for_event(msg: Msg) -> Item:
    event: RunEvent = _decoded(msg, _decode_event)
    common: dict[str, Any] = {
        "run_id": event.run_id,
        "source": event.source,
        "trigger": event.trigger,
        "scheduled_for": event.scheduled_for,
        "attempts": event.attempt,
        "trace_id": message_trace_id(msg.headers),
        "replay": event.replay,
    }
    if isinstance(event, FetchStarted):
        run = run_row(
            **common, status="fetching", started_at=event.started_at, queued_at=event.queued_at
        )
        return Item(msg, [], run)
    if isinstance(event, RunMissed):
        run = run_row(**common, status="missed", error=event.reason or None, error_code="missed")
        return Item(msg, [], run)
    if isinstance(event, FetchUnchanged):
        run = run_row(
            **common,
            status="unchanged",
            http_status=event.http_status,
            finished_at=event.finished_at,
            note=event.note or None,
            queued_at=event.queued_at,
            started_at=event.started_at,
        )
        return Item(msg, [], run)
    if isinstance(event, FetchFailed):
        run = run_row(
            **common,
            status="failed",
            http_status=event.http_status,
            error_code=event.error_code,
            error=event.error,
            finished_at=event.failed_at,
            queued_at=event.queued_at,
            started_at=event.started_at,
        )
        return Item(msg, [], run)
    assert isinstance(event, RawPayload)
    run = run_row(
        **common,
        status="stored" if event.last else "fetching",
        pages=event.page + 1,
        rows=event.run_rows if event.run_rows is not None else event.page + 1,
        bytes=event.run_bytes,
        http_status=event.status_code,
        finished_at=event.fetched_at if event.last else None,
        queued_at=event.queued_at,
        started_at=event.started_at,
    )
    # Its rows are built with the rest of its transaction (``Writer._build_rows``).
    return Item(
        msg,
        [],
        run,
        body_ref=event.body_ref,
        payload=event,
        state_row=state_row(event),
        size=len(msg.data) + ((event.body_size or 0) if event.body_ref is not None else 0),
    )


def transactions(items: Sequence[Item], budget: int) -> Iterator[list[Item]]:
    """Consecutive items in groups of at most ``budget`` bytes (one item at least), in order."""
    group: list[Item] = []
    held = 0
    for item in items:
        if group and held + item.size > budget:
            yield group
            group, held = [], 0
        group.append(item)
        held += item.size
    if group:
        yield group


class HandBack(Exception):
    """The writer is stopping while it holds a batch for PostgreSQL: hand the messages back."""


class Batch:
    """The messages of one fetch until each is settled (acked, naked or termed).

    While the writer holds them — PostgreSQL unavailable, a batch of large bodies written a
    budget at a time — ``keep_alive`` tells JetStream they are in progress, so none is
    redelivered; ``hand_back`` gives back any left unsettled, once.

    A pull request may outlive the fetch that sent it (nats-py): messages it delivers late
    wait in the subscription, counted as delivered, and would be redelivered (a delivery
    spent) while the writer holds this batch. ``keep_alive`` takes them too, into ``late``:
    kept alive with the batch, and written next.
    """

    def __init__(self, msgs: Sequence[Msg], late: list[Msg]) -> None:
        self._open: dict[int, Msg] = {id(msg): msg for msg in msgs}
        self.late = late

    def __len__(self) -> int:
        return len(self._open)

    async def ack(self, msg: Msg) -> None:
        await self._settle(msg, msg.ack)

    async def term(self, msg: Msg) -> None:
        await self._settle(msg, msg.term)

    async def nak(self, msg: Msg, delay: float | None = None) -> None:
        async def nak() -> None:
            await msg.nak(delay=delay)

        await self._settle(msg, nak)

    async def hand_back(self, delay: float | None = None) -> None:
        """Nak what is left unsettled (not ``late``: ``_consume`` writes or hands it back)."""
        for msg in list(self._open.values()):
            await self.nak(msg, delay)

    async def keep_alive(self, every_s: float, arrived: Callable[[], Awaitable[list[Msg]]]) -> None:
        """Every ``every_s``: take what arrived late, and tell JetStream every message in hand
        is in progress. Never raises (a failure is logged; the next round tries again)."""
        while True:
            await anyio.sleep(every_s)
            try:
                self.late.extend(await arrived())
                for msg in [*self._open.values(), *self.late]:
                    await msg.in_progress()
            except Exception as exc:
                log.warning("write.keep_alive_failed", extra={"error": str(classify(exc))})

    def release(self, msg: Msg) -> None:
        """Someone else settles ``msg`` from now on (the dead-letter office)."""
        self._open.pop(id(msg), None)

    async def _settle(self, msg: Msg, action: Callable[[], Awaitable[Any]]) -> None:
        if self._open.pop(id(msg), None) is not None:
            await settle(action, log=log, event="write.settle_failed")
