"""Commands of a busy source wait outside the fetcher's window, on ``<prefix>.deferred.<source>``.

One run per source at a time (unless ``allow_overlap``): a command for a source that is running
here, or whose lease another replica holds (``_leases``), is set aside on the deferred stream
and acked, so it holds no place in the consumer's window of 256 unacknowledged commands and a
slow source cannot starve the others. When the source's run ends, its oldest deferred command
goes back to the collect stream; a sweep every few seconds does the same for sources nobody
runs (another replica's run ended, a process died).

A source's commands run in the order they came (a backfill goes oldest first): a command that
arrives while earlier ones of its source wait, or while one is on its way back, goes behind
them, and the oldest comes back. The count of commands set aside is known without asking the
stream after every run (a round trip each, for nothing, on the common path): this process
counts its own when they are stored, a core subscription on the deferred subjects counts every
replica's (``watch``), and the sweep corrects the count from the stream's own subject counts.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import msgspec

from contracts import CollectCommand, encode, source_of
from daemon.errors import TransientError
from daemon.fetcher._leases import Leases
from daemon.ids import UNDEFER_PREFIX, defer_id, undefer_id
from daemon.platform.bus import Bus, Msg, Subscription, trace_headers
from daemon.platform.logs import get_logger

__all__ = ["SWEEP_EVERY_S", "Deferrals"]

log = get_logger("fetcher")

#: How often sources with deferred commands and no run anywhere are looked for.
SWEEP_EVERY_S = 5.0
#: How long a command sent back counts as on its way here: another replica may have taken it.
RETURN_WITHIN_S = 2.0


class Deferrals:
    """Sets commands aside while their source is busy, and brings them back."""

    def __init__(self, bus: Bus, running: Mapping[str, int], leases: Leases | None) -> None:
        self._bus = bus
        #: Per source: runs of it in this process (the fetcher's own count).
        self._running = running
        self._leases = leases
        #: Per source: commands set aside (this process's own, those seen on the deferred
        #: subjects from other replicas, corrected by the sweep).
        self._waiting: dict[str, int] = {}
        #: Per source: when its oldest deferred command was sent back to the collect stream and
        #: has not been taken here yet (the clock of ``anyio.current_time``).
        self._returning: dict[str, float] = {}
        #: Message ids of this process's commands set aside, not yet seen on the subscription
        #: (counted once, by ``defer``).
        self._mine: set[str] = set()

    async def watch(self) -> Subscription:
        """Count the commands other replicas set aside from now on (unsubscribe when done)."""

        async def seen(msg: Msg) -> None:
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            if msg_id in self._mine:
                self._mine.discard(msg_id)
                return
            source = source_of(msg.subject)
            self._waiting[source] = self._waiting.get(source, 0) + 1

        return await self._bus.subscribe(self._bus.subjects.deferred_all, seen)

    def brought_back(self, msg: Msg, source: str) -> bool:
        """Whether ``msg`` is a deferred command of ``source`` sent back to run now (it goes
        before the commands still waiting); taking it ends its way back."""
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        if not msg_id.startswith(UNDEFER_PREFIX):
            return False
        self._returning.pop(source, None)
        return True

    def ahead(self, source: str) -> bool:
        """Whether earlier commands of ``source`` wait, or one is on its way back: a new one
        goes behind them."""
        return self._waiting.get(source, 0) > 0 or self._on_its_way(source)

    def _on_its_way(self, source: str) -> bool:
        since = self._returning.get(source)
        return since is not None and anyio.current_time() - since < RETURN_WITHIN_S

    async def defer(self, msg: Msg, command: CollectCommand, attempt: int, why: str) -> None:
        """Set the command aside on the deferred stream (outside the consumer's window) and
        ack it; it comes back when the source is free, its attempts so far counted."""
        aside = msgspec.structs.replace(command, attempts_done=attempt - 1)
        headers = trace_headers(msg.headers)
        seq = msg.metadata.sequence.stream if msg.reply else 0
        msg_id = headers["Nats-Msg-Id"] = defer_id(seq, command.run_id)
        self._mine.add(msg_id)
        try:
            await self._bus.forward(
                self._bus.subjects.deferred(command.source), encode(aside), headers
            )
        except BaseException:
            self._mine.discard(msg_id)
            raise
        self._waiting[command.source] = self._waiting.get(command.source, 0) + 1
        await msg.ack()
        log.info(
            "fetch.deferred",
            extra={"source": command.source, "run_id": command.run_id, "why": why},
        )

    async def next(self, source: str) -> None:
        """The source is free here: send its oldest deferred command back, unless none waits
        or one is on its way back already."""
        if self._waiting.get(source, 0) > 0 and not self._on_its_way(source):
            await self.undefer(source)

    async def undefer(self, source: str) -> bool:
        """Move the source's oldest deferred command back to the collect stream; True if one
        was moved. Failing is logged: the sweep tries again."""
        s = self._bus.subjects
        self._returning[source] = anyio.current_time()
        try:
            found = await self._bus.message_at(
                s.defer_stream, 1, subject=s.deferred(source), or_next=True
            )
            if found is None:
                self._waiting.pop(source, None)
                self._returning.pop(source, None)
                return False
            if (left := self._waiting.get(source, 1) - 1) > 0:
                self._waiting[source] = left
            else:
                self._waiting.pop(source, None)
            headers = trace_headers(found.headers)
            headers["Nats-Msg-Id"] = undefer_id(found.seq)
            await self._bus.forward(s.collect(source), found.data, headers)
            # Gone already: another replica moved it meanwhile; the message id made one of two.
            await self._bus.delete_message(s.defer_stream, found.seq)
        except TransientError as exc:
            self._returning.pop(source, None)
            log.warning("fetch.undefer_failed", extra={"source": source, "error": str(exc)})
            return False
        return True

    async def sweep(self) -> None:
        """Every ``SWEEP_EVERY_S``: bring back a deferred command of each source that nobody
        runs (its run ended in another process, or one died holding it)."""
        s = self._bus.subjects
        while True:
            await anyio.sleep(SWEEP_EVERY_S)
            try:
                waiting = await self._bus.subject_counts(s.defer_stream, s.deferred_all)
            except TransientError as exc:
                log.warning("fetch.sweep_failed", extra={"error": str(exc)})
                continue
            self._waiting = {source_of(subject): n for subject, n in waiting.items() if n}
            self._mine.clear()  # one seen late is counted twice: one stream read for nothing
            # A command sent back that no run here took soon went to another replica.
            self._returning = {n: t for n, t in self._returning.items() if self._on_its_way(n)}
            for subject, count in waiting.items():
                source = source_of(subject)
                if not count or self._running.get(source) or self._on_its_way(source):
                    continue
                if self._leases is not None and await self._leases.held(source):
                    continue
                await self.undefer(source)
