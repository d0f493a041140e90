"""Queue a run: build its collect command and publish it, starting the run's trace.

Shared by the ticker (scheduled slots, catch-up) and the service (manual triggers, backfills). Each
run gets its own trace: a root span named after the trigger, whose producer span's context travels
with the command to the fetcher and on to the writer.

``queue_run`` does it all for one run. The ticker, which may have thousands of runs due at one
instant, splits the work: ``prepare_run`` before the instant (run id, command, subject, both
spans started at the instant they are due, the header block carrying their context, encoded
for the wire), then ``queue_burst`` at the instant, which only stamps and encodes each command
and hands them all to the bus, which writes them at once with their acks in flight together
(``Bus.publish_burst``). A prepared command's ``requested_at`` is set when it is published, to
the time it was handed to the bus (read once per ``STAMP_EVERY`` commands), as for
``queue_run``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from contracts import CollectCommand, Trigger, encode
from daemon.errors import TransientError
from daemon.platform import spans
from daemon.platform.bus import Bus, PubAck, header_block
from daemon.platform.spans import Span
from daemon.settings import SourceConfig

__all__ = [
    "STAMP_EVERY",
    "PreparedRun",
    "Queued",
    "prepare_run",
    "queue_burst",
    "queue_run",
]

#: A burst reads the clock for ``requested_at`` (and lateness) once per this many commands.
STAMP_EVERY = 256
#: How long a burst waits for its acks after its last command went out.
BURST_ACK_TIMEOUT_S = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def queue_run(
    bus: Bus,
    source: SourceConfig,
    scheduled_for: datetime,
    *,
    run_id: str,
    trigger: Trigger,
    now: datetime,
) -> CollectCommand:
    """Publish the command for one run; JetStream de-duplicates it by ``run_id``."""
    command = _command(source, scheduled_for, run_id, trigger, requested_at=now)
    with spans.run_span(
        trigger, source.name, run_id=run_id, scheduled_for=scheduled_for.isoformat()
    ):
        await bus.publish(
            bus.subjects.collect(source.name),
            command,
            msg_id=run_id,
            source=source.name,
            run_id=run_id,
        )
    return command


def _command(
    source: SourceConfig,
    scheduled_for: datetime,
    run_id: str,
    trigger: Trigger,
    *,
    requested_at: datetime,
) -> CollectCommand:
    return CollectCommand(
        run_id=run_id,
        source=source.name,
        scheduled_for=scheduled_for,
        interval_start=source.cron.prev_before(scheduled_for),
        trigger=trigger,
        requested_at=requested_at,
    )


@dataclass(slots=True)
class PreparedRun:
    """A run ready to publish at ``due``: everything but the time it is handed to the bus."""

    command: CollectCommand
    subject: str
    #: Its headers (``Nats-Msg-Id``, the trace context) as written on the wire.
    header: bytes
    #: When it may be published (its slot, plus the source's jitter; later for a retry).
    due: datetime
    root: Span
    producer: Span

    @property
    def run_id(self) -> str:
        return self.command.run_id

    @property
    def source(self) -> str:
        return self.command.source


@dataclass(frozen=True, slots=True)
class Queued:
    """What became of one run of a burst."""

    run: PreparedRun
    #: When its command was handed to the bus (its ``requested_at``).
    sent_at: datetime
    #: The ack, or why the bus refused it (retry later: the run id de-duplicates).
    outcome: PubAck | TransientError


def prepare_run(
    bus: Bus,
    source: SourceConfig,
    scheduled_for: datetime,
    *,
    run_id: str,
    trigger: Trigger,
    due: datetime,
) -> PreparedRun:
    """Build a run's command and start its trace at ``due``, ahead of publishing it."""
    subject = bus.subjects.collect(source.name)
    command = _command(source, scheduled_for, run_id, trigger, requested_at=due)  # stamped later
    root, producer, headers = spans.start_send(
        f"{trigger} {source.name}",
        subject,
        start_ns=_ns(due),
        source=source.name,
        run_id=run_id,
        root_attributes={
            "coleta.trigger": trigger,
            "coleta.scheduled_for": scheduled_for.isoformat(),
        },
    )
    return PreparedRun(command, subject, header_block(headers), due, root, producer)


async def queue_burst(
    bus: Bus, runs: Sequence[PreparedRun], now: Callable[[], datetime]
) -> list[Queued]:
    """Publish prepared runs together, in order; one ``Queued`` each, never raises
    ``TransientError`` (a refused run says so in its outcome, and its trace records why)."""
    sent_at: list[datetime] = []
    sizes: list[int] = []

    def outgoing() -> Iterator[tuple[str, bytes, bytes]]:
        stamp = now()
        for index, run in enumerate(runs):
            if index % STAMP_EVERY == 0 and index:
                stamp = now()
            payload = encode(msgspec.structs.replace(run.command, requested_at=stamp))
            sent_at.append(stamp)
            sizes.append(len(payload))
            yield run.subject, payload, run.header

    outcomes: list[PubAck | TransientError]
    try:
        outcomes = await bus.publish_burst(outgoing(), timeout_s=BURST_ACK_TIMEOUT_S)
    except TransientError as exc:
        outcomes = [exc] * len(runs)
    end_ns = _ns(now())
    queued: list[Queued] = []
    for index, (run, outcome) in enumerate(zip(runs, outcomes, strict=True)):
        at = sent_at[index] if index < len(sent_at) else now()
        error = outcome if isinstance(outcome, TransientError) else None
        size = sizes[index] if index < len(sizes) else None
        spans.end_send(run.root, run.producer, end_ns=end_ns, body_size=size, error=error)
        queued.append(Queued(run, at, outcome))
    return queued


def _ns(when: datetime) -> int:
    """Nanoseconds since the epoch, as span times are given."""
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
