"""raw payload → write → Postgres: persist run events in batches, idempotently.

Two durable consumers feed the writer: ``runs`` on the command stream records each run as
``queued`` the moment it is asked for, and ``writer`` on the raw stream stores payloads and run
outcomes. Each batch is written in transactions of at most ``BATCH_BYTES`` (bodies held in the
object store count by their size) — rows inserted with ``ON CONFLICT (run_id, page, record,
content_sha256) DO NOTHING`` and the runs' records updated alongside — and messages are acked
only after commit. A message delivered again therefore inserts nothing twice, a crash before
the ack only replays, and a replay that fetched other content stores it beside the first.

A group of messages is written and settled by ``_commit``, its transaction by ``_store``.

Source state (how the next run asks): the last page of a run carries its validators (``ETag``,
``Last-Modified``, body sha256, for one-request runs) and its incremental cursor; they go to the
``source_state`` table in the transaction of the data they came from, so a crash can neither
skip nor repeat a range — and not at all when the run is already recorded ``failed`` in the
same replay (a page of it was rejected): the state never gets ahead of the rows stored. The
fetcher has no database access: after each commit, and at start-up, the writer copies the
touched rows of ``source_state`` into the key-value bucket ``<prefix>_sources`` (key: source
name, value: JSON), which the fetcher reads (``_source_states``). PostgreSQL stays the source
of truth; a copy that fails is logged and tried again until it succeeds (a run that starts
meanwhile may ask for a range again — never skip one).

Every failure is classified once (``daemon.errors``), and nothing raised while writing a batch
stops the consumer:

- PostgreSQL unavailable (``StoreUnavailable``: connection lost, server restarting): the batch
  is held — its messages kept alive with ``in_progress`` — and tried again with capped backoff
  until PostgreSQL answers (``_store``); no delivery is spent. Stopping hands held messages
  back (one nak).
- PostgreSQL refusing a batch (``StoreRejected``), or anything unclassified: the batch is
  retried one message per transaction, so one bad row cannot sink the others; the bad one's
  run is marked ``failed`` with the reason (when its record can be written at all) and the
  message goes to the dead-letter stream.
- A message that is not a valid contract (undecodable, wrong type, nested too deep) is poison:
  dead-lettered, the rest of its batch written.
- A message is termed only once its dead letter is stored: while the dead-letter stream refuses
  it, it stays on its own stream (nak with a delay).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import TaskStatus

from daemon.errors import (
    PoisonMessage,
    TransientError,
    classify,
)
from daemon.platform import spans
from daemon.platform.bus import Bus, Msg, PullSubscription
from daemon.platform.db import Database
from daemon.platform.dead_letters import DeadLetters
from daemon.platform.logs import get_logger
from daemon.writer._batch import (
    Batch,
    HandBack,
    Item,
    item_for_command,
    item_for_event,
    transactions,
)
from daemon.writer._commit import RETRY_S, Committer
from daemon.writer._store import Store

__all__ = ["BATCH_BYTES", "Writer"]

log = get_logger("writer")

#: Short pull waits: a stop takes effect after the current one (it is not cancelled).
_FETCH_WAIT_S = 0.5
#: About how many bytes of messages one transaction holds, bodies held in the object store
#: included (``writer_batch_size`` bounds the count).
BATCH_BYTES = 16 * 1024 * 1024
#: A message is kept alive (``in_progress``) this many times per ``ack_wait``.
_KEEP_ALIVE_PER_ACK_WAIT = 3


class Writer:
    """Persists commands (as queued runs) and run events (as rows and run outcomes)."""

    def __init__(
        self,
        bus: Bus,
        db: Database,
        *,
        batch_size: int,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self._bus = bus
        self._db = db
        self._batch_size = batch_size
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        store = Store(db, self._stopping)
        self._commit = Committer(bus, store, dead_letters or DeadLetters(bus))

    def stop_intake(self) -> None:
        """Finish the fetch and the batch in hand, then take no more.

        The fetch in progress is not cancelled: a cancelled pull request stays open on the
        server until it expires, and a message delivered to it would wait out ``ack_wait``.
        A batch held while PostgreSQL is unavailable is handed back at once.
        """
        self._stopping.set()

    async def drain(self) -> None:
        """Wait until both consumers have written their last batch and let go."""
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self._bus.subjects
        runs = await self._bus.pull(s.collect_stream, s.runs_consumer)
        raw = await self._bus.pull(s.raw_stream, s.writer_consumer)
        try:
            async with anyio.create_task_group() as tg:
                # The fetcher's copy of source_state: whole at start-up, then repaired after
                # any copy that failed, for as long as the consumers write.
                tg.start_soon(self._commit.source_states.run, name="writer-source-state")
                async with anyio.create_task_group() as consumers:
                    consumers.start_soon(
                        self._consume, runs, item_for_command, s.runs_consumer, name="writer-runs"
                    )
                    consumers.start_soon(
                        self._consume, raw, item_for_event, s.writer_consumer, name="writer-raw"
                    )
                    task_status.started()
                tg.cancel_scope.cancel()
            await self._bus.unsubscribe(runs)
            await self._bus.unsubscribe(raw)
            self._stopped.set()
            await anyio.sleep_forever()
        finally:
            await self._bus.unsubscribe(runs)
            await self._bus.unsubscribe(raw)

    async def _consume(
        self, sub: PullSubscription, build: Callable[[Msg], Item], consumer: str
    ) -> None:
        # Batches are bounded in bytes too: 256 pages of almost 1 MiB would hold 256 MiB.
        # The next batch asks for as many messages as the last ones' size fits in the budget
        # (bodies in the object store included), starting as if every message were as large
        # as NATS allows; a batch over the budget anyway is written in several transactions.
        want = self._batch_limit(self._bus.max_payload)
        late: list[Msg] = []

        async def arrived() -> list[Msg]:
            pending = sub.pending_msgs
            return await self._bus.fetch(sub, pending, _FETCH_WAIT_S) if pending else []

        try:
            while not self._stopping.is_set():
                msgs = late or await self._bus.fetch(sub, want, _FETCH_WAIT_S)
                late = []
                if msgs:
                    held = await self._write_batch(msgs, build, consumer, late, arrived)
                    want = self._batch_limit(held // len(msgs))
        finally:
            with anyio.CancelScope(shield=True):
                await Batch(late, []).hand_back()

    def _batch_limit(self, message_bytes: int) -> int:
        return max(1, min(self._batch_size, BATCH_BYTES // max(1, message_bytes)))

    async def _write_batch(
        self,
        msgs: Sequence[Msg],
        build: Callable[[Msg], Item],
        consumer: str,
        late: list[Msg],
        arrived: Callable[[], Awaitable[list[Msg]]],
    ) -> int:
        """Write one fetch's messages, kept alive until each is settled; the bytes they hold.

        Nothing raised here reaches ``_consume``: failures are classified where they happen,
        and a defect of this code itself hands the batch back for a later delivery.
        Messages that ``arrived`` meanwhile go to ``late``.
        """
        batch = Batch(msgs, late)
        held = sum(len(msg.data) for msg in msgs)
        try:
            async with anyio.create_task_group() as tg:
                every_s = self._bus.options.ack_wait_s / _KEEP_ALIVE_PER_ACK_WAIT
                tg.start_soon(
                    batch.keep_alive, every_s, arrived, name=f"writer-keep-alive-{consumer}"
                )
                try:
                    items = await self._decode(batch, msgs, build)
                    held += sum(item.size - len(item.msg.data) for item in items)  # bodies
                    for group in transactions(items, BATCH_BYTES):
                        await self._commit.write(batch, group, consumer)
                except HandBack:
                    log.info("write.handed_back", extra={"size": len(batch)})
                except Exception as exc:  # a defect here: never stop the consumer for it
                    log.exception(
                        "write.batch_failed", extra={"error": _text(exc), "size": len(batch)}
                    )
                    await batch.hand_back(delay=RETRY_S)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await batch.hand_back()  # stopping or cancelled: whatever is left, once
        return held

    async def _decode(
        self, batch: Batch, msgs: Sequence[Msg], build: Callable[[Msg], Item]
    ) -> list[Item]:
        """The batch's messages decoded; one that is not a valid contract is dead-lettered."""
        items: list[Item] = []
        for msg in msgs:
            try:
                item = build(msg)
            except Exception as exc:
                # Poison: undecodable, the wrong type, nested too deep. Anything else (too
                # large, a bug) cannot make it valid either — unless classified transient.
                found = classify(exc)
                if isinstance(found, TransientError):
                    log.warning("write.decode_retry", extra={"error": str(found)})
                    await batch.nak(msg, RETRY_S)
                    continue
                if not isinstance(found, PoisonMessage):
                    found = PoisonMessage(f"not a valid message: {found}", subject=msg.subject)
                why = classify((exc.__cause__ if isinstance(exc, PoisonMessage) else None) or exc)
                with spans.in_trace_of(msg.headers):
                    log.error(
                        "write.poison",
                        extra={"subject": msg.subject, "error": str(why), "kind": why.code},
                    )
                await self._commit.dead_letter(batch, msg, None, found.code, str(found))
                continue
            item.size = max(item.size, len(msg.data))
            items.append(item)
        return items


def _text(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__
