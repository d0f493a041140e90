"""The dead-letter office: a message that cannot be processed is kept, never dropped.

``DeadLetters.dispose(msg, ...)`` stores the message's dead letter (``store``: on
``<prefix>.dlq.<source>.<code>``, a large original through the object store), runs what the stage
must do once it is stored (``then``: record the run as failed), and settles the message (``term``:
JetStream never delivers it again). When the bus refuses (the dead-letter stream full or
unavailable), the message is *held*: kept alive on its stream with ``in_progress``, so it is neither
redelivered nor counted against ``max_deliver``, and tried again with capped backoff until its
letter is stored. A shutdown hands held messages back (``nak``): they come again after a restart.
The caller goes on at once either way; a held message occupies only a slot in its consumer's window.

The office also listens for JetStream's max-deliveries advisories
(``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``): a message that exhausted
its consumer's ``max_deliver`` (a daemon that died or hung holding it, each time) is read back
from its stream and dead-lettered with code ``max_deliveries``; for a collect command
``on_exhausted`` records its run as failed. Replicas share the advisories (a queue group) and
the letter's message id is its stream position, so each becomes one dead letter. An advisory is
a plain NATS message: one sent while no daemon listens is lost, and its message stays on the
stream until ``stream_max_age_s`` (documented in the README's failure table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import anyio
import msgspec
from anyio.abc import TaskStatus

from contracts import DeadLetter, encode, source_of, subject_token
from daemon.errors import TransientError
from daemon.ids import MAX_ECHO, dead_letter_id, dead_letter_object
from daemon.platform import metrics, tracing
from daemon.platform.bus import Bus, Msg, Original, settle
from daemon.platform.logs import get_logger
from daemon.platform.redact import redact_text
from daemon.platform.retry import Backoff, Retrying, retry, transient

__all__ = ["MAX_DELIVERIES", "MAX_ERROR_TEXT", "DeadLetters", "Exhausted", "original_of", "store"]

log = get_logger("dlq")

#: A held message (and an advisory's) is tried again after 1 s at first, doubling up to 30 s.
_BACKOFF = Backoff(first_s=1.0, cap_s=30.0)
#: A dead letter repeats at most this much of an error text.
MAX_ERROR_TEXT = 4000
#: Room kept for a message's NATS headers (message id, trace context) within the max payload.
_HEADER_ROOM = 4096
#: Advisories are shared by every replica of one deployment.
_ADVISORY_QUEUE = "coleta-advisories"
#: The code of a message that exhausted its consumer's deliveries.
MAX_DELIVERIES = "max_deliveries"


class _Advisory(msgspec.Struct, frozen=True):
    """The fields of a max-deliveries advisory that matter here."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0


@dataclass(frozen=True, slots=True)
class Exhausted:
    """A message read back after it exhausted ``consumer``'s deliveries."""

    original: Original
    consumer: str


@dataclass(slots=True)
class _Held:
    msg: Msg
    job: Callable[[], Awaitable[None]]
    settle: Callable[[], Awaitable[object]]
    source: str
    code: str
    stage: str
    due: float = 0.0
    alive_at: float = 0.0
    error: str = ""
    tries: int = field(default=1)


class DeadLetters:
    """Stores dead letters for every stage; holds what cannot be stored yet."""

    def __init__(
        self,
        bus: Bus,
        *,
        on_exhausted: Callable[[Exhausted], Awaitable[None]] | None = None,
    ) -> None:
        self._bus = bus
        self._on_exhausted = on_exhausted
        self._held: list[_Held] = []
        self._wake = anyio.Event()

    def on_exhausted(self, handler: Callable[[Exhausted], Awaitable[None]]) -> None:
        """Who records a run as failed when its command exhausted the fetcher's deliveries."""
        self._on_exhausted = handler

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Retry held messages and handle advisories until cancelled; then hand back the
        held messages so they are delivered again."""
        s = self._bus.subjects
        subs = []
        try:
            async with anyio.create_task_group() as tg:

                async def on_advisory(msg: Msg) -> None:
                    tg.start_soon(self._advisory, msg.data, name="dlq-advisory")

                for stream in (s.collect_stream, s.raw_stream):
                    subject = s.max_deliveries_advisories(stream)
                    subs.append(
                        await self._bus.subscribe(subject, on_advisory, queue=_ADVISORY_QUEUE)
                    )
                tg.start_soon(self._retry_held, name="dlq-held")
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for sub in subs:
                    await self._bus.unsubscribe(sub)
                await self._hand_back()

    async def dispose(
        self,
        msg: Msg,
        *,
        source: str,
        run_id: str | None,
        code: str,
        error: str,
        msg_id: str | None = None,
        then: Callable[[], Awaitable[None]] | None = None,
        settle: Literal["term", "ack"] = "term",
        stage: str,
    ) -> bool:
        """Dead-letter ``msg``, run ``then``, settle it; True when done now, False when held.

        ``then`` must be idempotent (it runs again if the bus refuses it once).
        """
        original = Original.of(msg)

        async def job() -> None:
            await store(
                self._bus,
                original,
                source=source,
                run_id=run_id,
                code=code,
                error=error,
                msg_id=msg_id,
            )
            if then is not None:
                await then()

        settler = msg.term if settle == "term" else msg.ack
        try:
            await job()
        except TransientError as exc:
            log.error(
                "dlq.held",
                extra={
                    "subject": msg.subject[:200],
                    "source": source,
                    "run_id": run_id,
                    "error_code": code,
                    "error": str(exc),
                },
            )
            now = anyio.current_time()
            self._held.append(
                _Held(
                    msg,
                    job,
                    settler,
                    source,
                    code,
                    stage,
                    due=now + _BACKOFF.delay(1),
                    alive_at=now,
                    error=str(exc),
                )
            )
            self._wake.set()
            return False
        self._stored(source, code, stage)
        await _settle(settler)
        return True

    def _stored(self, source: str, code: str, stage: str) -> None:
        metrics.record_dead_letter(source, code, stage=stage)

    async def _retry_held(self) -> None:
        keep_alive = max(0.5, self._bus.options.ack_wait_s / 3)
        while True:
            if not self._held:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            now = anyio.current_time()
            for held in list(self._held):
                if now - held.alive_at >= keep_alive:
                    held.alive_at = now
                    await _settle(held.msg.in_progress)
                if now < held.due:
                    continue
                try:
                    await held.job()
                except TransientError as exc:
                    held.tries += 1
                    held.error = str(exc)
                    held.due = anyio.current_time() + _BACKOFF.delay(held.tries)
                    continue
                self._held.remove(held)
                self._stored(held.source, held.code, held.stage)
                log.info(
                    "dlq.stored_after_hold",
                    extra={"source": held.source, "error_code": held.code, "tries": held.tries},
                )
                await _settle(held.settle)
            soonest = min(
                [held.due for held in self._held]
                + [held.alive_at + keep_alive for held in self._held],
                default=now + 1.0,
            )
            with anyio.move_on_after(max(0.05, soonest - anyio.current_time())):
                self._wake = anyio.Event()
                await self._wake.wait()

    async def _hand_back(self) -> None:
        held, self._held = self._held, []
        for item in held:
            await _settle(item.msg.nak)
        if held:
            log.warning("dlq.handed_back", extra={"messages": len(held)})

    async def _advisory(self, data: bytes) -> None:
        """Dead-letter the message an advisory names (read back from its stream)."""
        try:
            advisory = msgspec.json.decode(data, type=_Advisory)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            log.warning("dlq.bad_advisory", extra={"error": str(exc)[:200]})
            return
        bus = self._bus
        try:
            found = await bus.message_at(advisory.stream, advisory.stream_seq)
        except TransientError as exc:
            log.error(
                "dlq.advisory_unreadable",
                extra={"stream": advisory.stream, "seq": advisory.stream_seq, "error": str(exc)},
            )
            return
        if found is None:
            return  # already gone (dead-lettered by another replica, or aged out)
        original = dataclasses.replace(found, deliveries=advisory.deliveries)
        source = source_of(original.subject)
        error = (
            f"delivered {advisory.deliveries} times to consumer {advisory.consumer} without"
            " being settled (max_deliver reached: the daemon died or hung with it each time)"
        )
        exhausted = Exhausted(original, advisory.consumer)
        fetcher = advisory.consumer == bus.subjects.fetcher_consumer

        async def dead_letter() -> None:
            await store(bus, original, source=source, run_id=None, code=MAX_DELIVERIES, error=error)
            if self._on_exhausted is not None and fetcher:
                await self._on_exhausted(exhausted)

        def retrying(failed: Retrying) -> None:
            log.warning(
                "dlq.advisory_retry", extra={"error": str(failed.error), "in_s": failed.delay_s}
            )

        await retry(
            dead_letter,
            retry_on=transient,
            backoff=_BACKOFF,
            on_retry=retrying,
        )
        stage = "fetcher" if fetcher else "writer"
        self._stored(source, MAX_DELIVERIES, stage)
        log.error(
            "dlq.max_deliveries",
            extra={
                "stream": advisory.stream,
                "seq": advisory.stream_seq,
                "consumer": advisory.consumer,
                "deliveries": advisory.deliveries,
                "subject": original.subject[:200],
            },
        )


async def _settle(action: Callable[[], Awaitable[object]]) -> None:
    await settle(action, log=log, event="dlq.settle_failed")


async def store(
    bus: Bus,
    original: Original,
    *,
    source: str,
    run_id: str | None,
    code: str,
    error: str,
    msg_id: str | None = None,
) -> None:
    """Keep a message that cannot be processed on ``<prefix>.dlq.<source>.<code>``, with why.

    The original travels inside the dead letter when it fits in one NATS message; a larger
    one is stored in the object store first and referenced (``original_ref``), so a dead
    letter never exceeds the max payload. Raises ``BusUnavailable`` when either is refused
    (the caller keeps the message: it must never be dropped before its letter is stored).
    """
    stream, seq = original.stream, original.seq
    letter = DeadLetter(
        source=subject_token(source),
        run_id=run_id[:MAX_ECHO] if run_id else None,
        subject=original.subject,
        original=original.data,
        error_code=subject_token(code),
        error=redact_text(error)[:MAX_ERROR_TEXT],
        dead_at=datetime.now(UTC),
        headers={k: v for k, v in original.headers.items() if len(k) + len(v) < 1024},
        stream=stream,
        stream_seq=seq or None,
        deliveries=original.deliveries,
    )
    payload = encode(letter)
    if len(payload) + _HEADER_ROOM > bus.max_payload:
        name = dead_letter_object(stream, seq, original.data)
        await bus.put_body(name, original.data)
        payload = encode(
            msgspec.structs.replace(
                letter, original=b"", original_ref=name, original_size=len(original.data)
            )
        )
        if len(payload) + _HEADER_ROOM > bus.max_payload:
            # Headers and texts are bounded above, so only a pathological subject is left.
            payload = encode(msgspec.structs.replace(letter, original=b"", headers={}))
    letter_id = msg_id or dead_letter_id(stream, original.subject, seq)
    headers = tracing.inject({"Nats-Msg-Id": letter_id[:MAX_ECHO]})
    await bus.forward(bus.subjects.dlq(letter.source, letter.error_code), payload, headers)


async def original_of(bus: Bus, letter: DeadLetter) -> bytes:
    """A dead letter's original message, from the object store when it was too large."""
    if letter.original_ref is None:
        return letter.original
    return await bus.get_body(letter.original_ref)
