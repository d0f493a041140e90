"""The dead-letter stream ``<prefix>.dlq.<source>.<error code>``: counting and replaying.

A dead letter holds the message that could not be processed, exactly as received. Replaying a
failed run's collect command re-queues it with ``replay`` incremented, so the run starts over
(its ``collection_runs`` record included) under the same run id; any other dead letter is
published again to its original subject. A replayed letter leaves the stream.
"""

from __future__ import annotations

import msgspec

from contracts import CollectCommand, DeadLetter, decoder, source_of
from daemon.errors import TransientError
from daemon.ids import replay_id, republish_id
from daemon.platform.bus import Bus, trace_headers
from daemon.platform.dead_letters import original_of
from daemon.platform.logs import get_logger

__all__ = ["counts", "replay"]

log = get_logger("dlq")

_decode_letter = decoder(DeadLetter).decode
_decode_command = decoder(CollectCommand).decode

#: Dead letters replayed by one request, at most (ask again for more).
MAX_REPLAY = 1000


async def counts(bus: Bus) -> dict[str, int]:
    """Dead letters waiting, per source."""
    s = bus.subjects
    out: dict[str, int] = {}
    for subject, n in (await bus.subject_counts(s.dlq_stream, s.dlq_all)).items():
        name = source_of(subject)
        out[name] = out.get(name, 0) + n
    return out


async def replay(bus: Bus, *, source: str | None, run_id: str | None) -> list[str]:
    """Re-queue matching dead letters, oldest first; returns what was replayed (run ids or
    subjects)."""
    s = bus.subjects
    seq, last = await bus.stream_bounds(s.dlq_stream)
    done: list[str] = []
    subject = s.dlq(source) if source is not None else s.dlq_all
    while seq <= last and len(done) < MAX_REPLAY:
        found = await bus.message_at(s.dlq_stream, seq, subject=subject, or_next=True)
        if found is None:
            break
        seq = found.seq + 1
        try:
            letter = _decode_letter(found.data)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            log.error("dlq.unreadable", extra={"seq": found.seq, "error": str(exc)})
            continue
        if run_id is not None and letter.run_id != run_id:
            continue
        await _republish(bus, letter, found.seq)
        try:
            await bus.delete_message(s.dlq_stream, found.seq)
        except TransientError as exc:  # replayed twice at worst: writes are idempotent
            log.warning("dlq.delete_failed", extra={"seq": found.seq, "error": str(exc)})
        done.append(letter.run_id or letter.subject)
        log.info(
            "dlq.replayed",
            extra={
                "source": letter.source,
                "run_id": letter.run_id,
                "error_code": letter.error_code,
            },
        )
    return done


async def _republish(bus: Bus, letter: DeadLetter, seq: int) -> None:
    original = await original_of(bus, letter)
    try:
        command = _decode_command(original)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        command = None
    if command is not None and bus.subjects.is_collect(letter.subject):
        again = msgspec.structs.replace(command, replay=command.replay + 1, attempts_done=0)
        await bus.publish(
            letter.subject,
            again,
            msg_id=replay_id(again),
            source=command.source,
            run_id=command.run_id,
        )
        return
    # Not a command (a payload PostgreSQL rejected, a poison message): send it back as it was,
    # in its own trace.
    headers = trace_headers(letter.headers)
    headers["Nats-Msg-Id"] = republish_id(seq)
    await bus.forward(letter.subject, original, headers)
