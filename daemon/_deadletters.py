"""The dead-letter stream ``<prefix>.dlq.<source>.<error code>``: counting and replaying.

A dead letter holds the message that could not be processed, exactly as received. Replaying a
failed run's collect command re-queues it with ``replay`` incremented, so the run starts over
(its ``collection_runs`` record included) under the same run id; any other dead letter is
published again to its original subject. A replayed letter leaves the stream.
"""

from __future__ import annotations

import msgspec
import nats.errors
import nats.js.errors

from contracts import CollectCommand, DeadLetter, decoder
from daemon._bus import Bus
from daemon._logging import get_logger

__all__ = ["counts", "replay"]

log = get_logger("dlq")

_decode_letter = decoder(DeadLetter).decode
_decode_command = decoder(CollectCommand).decode

#: Dead letters replayed by one request, at most (ask again for more).
MAX_REPLAY = 1000


async def counts(bus: Bus) -> dict[str, int]:
    """Dead letters waiting, per source."""
    s = bus.subjects
    info = await bus.js.stream_info(s.dlq_stream, subjects_filter=s.dlq_all)
    out: dict[str, int] = {}
    for subject, n in (info.state.subjects or {}).items():
        name = subject.split(".")[-2]
        out[name] = out.get(name, 0) + n
    return out


async def replay(bus: Bus, *, source: str | None, run_id: str | None) -> list[str]:
    """Re-queue matching dead letters, oldest first; returns what was replayed (run ids or
    subjects)."""
    s = bus.subjects
    info = await bus.js.stream_info(s.dlq_stream)
    done: list[str] = []
    subject = s.dlq(source) if source is not None else s.dlq_all
    seq = info.state.first_seq
    while seq <= info.state.last_seq and len(done) < MAX_REPLAY:
        try:
            raw = await bus.js.get_msg(s.dlq_stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        seq = (raw.seq or seq) + 1
        try:
            letter = _decode_letter(raw.data or b"")
        except msgspec.ValidationError as exc:
            log.error("dlq.unreadable", extra={"seq": raw.seq, "error": str(exc)})
            continue
        if run_id is not None and letter.run_id != run_id:
            continue
        await _republish(bus, letter, raw.seq or 0)
        try:
            await bus.js.delete_msg(s.dlq_stream, raw.seq or 0)
        except nats.errors.Error as exc:  # replayed twice at worst: writes are idempotent
            log.warning("dlq.delete_failed", extra={"seq": raw.seq, "error": str(exc)})
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
    try:
        command = _decode_command(letter.original)
    except (msgspec.ValidationError, msgspec.DecodeError):
        command = None
    if command is not None and letter.subject.startswith(f"{bus.subjects.prefix}.collect."):
        again = msgspec.structs.replace(command, replay=command.replay + 1)
        await bus.publish(
            letter.subject,
            again,
            msg_id=f"{command.run_id}/replay/{again.replay}",
            source=command.source,
            run_id=command.run_id,
        )
        return
    # Not a command (a payload PostgreSQL rejected, a poison message): send it back as it was.
    await bus.publish_raw(
        letter.subject,
        letter.original,
        msg_id=f"dlq-replay/{seq}",
        source=letter.source,
        run_id=letter.run_id or "",
    )
