"""command → fetch: take collect commands from the bus, at most ``max_concurrent_fetches`` at
a time, each run in its own named task.

The command is acked only after JetStream has accepted the run's payloads (``_run``), so a crash
at any point redelivers the command; the payload's ``Nats-Msg-Id`` and the writer's unique
``(run_id, page, record, content)`` make the repeat harmless.

Every failure is classified once (``daemon.errors``): an API failure that may pass is retried
within the source's ``retries.max_attempts`` (``_run``); the bus refusing is retried with capped
backoff (the command handed back with a delay); anything else — a permanent API answer, a
hostile body, a bug — fails the run with a stable code and keeps the command in the dead-letter
stream (``_events``). Nothing raised while handling a command stops the fetcher, and no command
is handed back more than the consumer's ``max_deliver`` times: its last delivery fails the run
instead. A source busy with a run waits aside (``_defer``).

Stopping: ``drain`` takes no new command and returns once every run in hand is settled; a run
still going when the daemon's shutdown deadline passes is cancelled, and its command handed back
(``nak``) to be run after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx
from anyio.abc import TaskStatus

from contracts import CollectCommand
from daemon.errors import PermanentError, PoisonMessage, TransientError, classify
from daemon.fetcher._defer import Deferrals
from daemon.fetcher._events import RunEvents, decode_command
from daemon.fetcher._leases import Lease, Leases
from daemon.fetcher._run import Runs, Started
from daemon.ids import MAX_ECHO
from daemon.platform import spans
from daemon.platform.bus import Bus, Msg, PullSubscription, deliveries, settle
from daemon.platform.dead_letters import DeadLetters
from daemon.platform.logs import get_logger
from daemon.platform.retry import Backoff
from daemon.settings import Settings, SourceConfig

__all__ = ["REPORT_STARTED_AFTER_S", "Fetcher", "fetch_max_deliver"]

log = get_logger("fetcher")

#: A run the bus refused is tried again after 2 s at first, doubling up to 60 s.
_BUS_BACKOFF = Backoff(first_s=2.0, cap_s=60.0)
#: Deliveries beyond the largest retry budget: hand-backs at shutdown or while the bus refuses.
_DELIVERY_ROOM = 10
#: A run whose outcome is not out after this long is reported ``fetching`` (``FetchStarted``);
#: a quicker one's outcome carries its start, and its record is written once.
REPORT_STARTED_AFTER_S = 1.0


def fetch_max_deliver(settings: Settings) -> int:
    """The fetcher consumer's ``max_deliver``: every source's retry budget fits in it."""
    budgets = [source.retries.max_attempts for source in settings.sources] or [1]
    return max(settings.max_deliveries, max(budgets) + _DELIVERY_ROOM)


@dataclass(slots=True)
class _Work:
    """One command being handled: its decoded form once known, and its source lease."""

    msg: Msg
    command: CollectCommand | None = None
    attempt: int = 1
    lease: Lease | None = None
    #: Set once the run is under way (not for a command set aside).
    started: Started | None = None
    #: When the keep-alive next tells JetStream it is in progress, and reports it started.
    alive_at: float = math.inf
    report_at: float = math.inf


class Fetcher:
    """Consumes ``<prefix>.collect.>`` and publishes run events on ``<prefix>.raw.<source>``."""

    def __init__(
        self,
        bus: Bus,
        http: httpx.AsyncClient,
        settings: Settings,
        *,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self._bus = bus
        self._settings = settings
        dead = dead_letters or DeadLetters(bus)
        self._events = RunEvents(bus, dead)
        dead.on_exhausted(self._events.exhausted)
        self._runs = Runs(bus, http, self._events)
        self._intake = anyio.CancelScope()
        self._drained = anyio.Event()
        self._slots = anyio.Semaphore(settings.max_concurrent_fetches)
        #: Commands in hand now.
        self.in_flight = 0
        #: Per source: runs of it in this process (sources without allow_overlap: 0 or 1).
        self._running: dict[str, int] = {}
        #: Leases keep runs of one source apart across replicas.
        self._leases = Leases(bus) if bus.leases is not None else None
        self._deferrals = Deferrals(bus, self._running, self._leases)
        #: Commands in hand, for the one keep-alive task of them all.
        self._hand: dict[int, _Work] = {}
        self._handed = anyio.Event()

    def reload(self, settings: Settings) -> None:
        """Fetch with these sources' configuration from now on (SIGHUP)."""
        self._settings = settings

    async def drain(self) -> None:
        """Take no new command, and return once every run in hand is settled."""
        self._intake.cancel()
        await self._drained.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subjects = self._bus.subjects
        sub = await self._bus.pull(subjects.collect_stream, subjects.fetcher_consumer)
        aside = await self._deferrals.watch()
        try:
            async with anyio.create_task_group() as aid:
                aid.start_soon(self._keep_alive, aid, name="fetcher-keep-alive")
                async with anyio.create_task_group() as runs:
                    sweeper = anyio.CancelScope()
                    runs.start_soon(self._sweep, sweeper, name="fetcher-deferred-sweep")
                    task_status.started()
                    with self._intake:
                        await self._take(sub, runs)
                    sweeper.cancel()
                    # Intake stopped: drop our interest now, so a command handed back below is
                    # not delivered to this process's last pull request (it would wait out
                    # ack_wait).
                    await self._bus.unsubscribe(sub)
                aid.cancel_scope.cancel()  # every run in hand is settled
            self._drained.set()  # the task group waited for every run in hand
        finally:
            await self._bus.unsubscribe(sub)
            await self._bus.unsubscribe(aside)

    async def _take(self, sub: PullSubscription, runs: anyio.abc.TaskGroup) -> None:
        while True:
            # Wait for a free slot, then ask for as many commands as there are slots.
            async with self._slots:
                free = self._slots.value + 1
                msgs = await self._bus.fetch(sub, free)
            for msg in msgs:
                await self._slots.acquire()
                runs.start_soon(self._handle, msg, name=f"fetcher-run-{msg.subject}")

    async def _sweep(self, scope: anyio.CancelScope) -> None:
        with scope:
            await self._deferrals.sweep()

    # -- one command ---------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        """Handle one command; whatever happens, it ends acked, termed, handed back or held
        by the dead-letter office — never lost, never crashing the fetcher."""
        self.in_flight += 1
        now = anyio.current_time()
        work = _Work(
            msg, alive_at=now + self._alive_every_s(), report_at=now + REPORT_STARTED_AFTER_S
        )
        self._hand[id(work)] = work
        self._handed.set()
        try:
            await self._process(work)
        except anyio.get_cancelled_exc_class():
            # Shutting down mid-run: hand the command back so the run is done after restart.
            await _settle(msg.nak)
            log.warning("fetch.handed_back", extra={"subject": msg.subject[:MAX_ECHO]})
            raise
        except Exception as exc:
            with anyio.CancelScope(shield=True):
                await self._failed(work, _unwrap(exc))
        finally:
            del self._hand[id(work)]
            self.in_flight -= 1
            self._slots.release()

    async def _failed(self, work: _Work, exc: BaseException) -> None:
        """Something escaped the run: classify it once and settle the command accordingly."""
        error = classify(exc)
        command = work.command
        fields: dict[str, object] = {
            "subject": work.msg.subject[:MAX_ECHO],
            "error_code": error.code,
            "error": str(error),
        }
        if command is not None:
            fields |= {"source": command.source, "run_id": command.run_id}
        if isinstance(error, TransientError) and not self._runs.last_delivery(work.msg):
            # The bus refused (NATS restarting, a stream full): the run is tried again later.
            delay = _BUS_BACKOFF.delay(deliveries(work.msg))
            log.warning("fetch.bus_unavailable", extra=fields | {"retry_in_s": delay})
            await self._bus.recover_after(exc)
            await _settle(lambda: work.msg.nak(delay=delay))
            return
        if isinstance(error, TransientError):
            error = PermanentError(
                f"gave up after {deliveries(work.msg)} deliveries: {error}", code=error.code
            )
        log.error("fetch.crashed", exc_info=exc, extra=fields)
        if command is None:
            await self._events.poison(work.msg, PoisonMessage(str(error)))
        else:
            started_at = work.started.at if work.started is not None else None
            await self._events.fail(
                work.msg, command, work.attempt, error.code, str(error), started_at=started_at
            )

    def _alive_every_s(self) -> float:
        return max(0.5, self._bus.options.ack_wait_s / 3)

    async def _keep_alive(self, aid: anyio.abc.TaskGroup) -> None:
        """For every command in hand (one task for them all, not one per run): tell JetStream
        it is alive every ``ack_wait_s / 3``, so a long fetch is not redelivered to another
        worker, keep its source's lease from expiring, and report a run still going after
        ``REPORT_STARTED_AFTER_S`` as ``fetching``. What waits for an answer (a lease, a
        report) runs in ``aid``, so one slow answer delays no other command's keep-alive."""
        every_s = min(self._alive_every_s(), REPORT_STARTED_AFTER_S) / 2
        while True:
            if not self._hand:
                self._handed = anyio.Event()
                await self._handed.wait()
            await anyio.sleep(every_s)
            now = anyio.current_time()
            for work in list(self._hand.values()):
                if work.report_at <= now:
                    work.report_at = math.inf
                    aid.start_soon(self._report_started, work, name="fetcher-report-started")
                if work.alive_at <= now:
                    work.alive_at = now + self._alive_every_s()
                    await _settle(work.msg.in_progress)
                    if work.lease is not None and self._leases is not None:
                        aid.start_soon(self._leases.refresh, work.lease, name="fetcher-lease")

    async def _report_started(self, work: _Work) -> None:
        """``FetchStarted`` for a run still going, unless the writer heard of it; failing is
        only logged (the run's outcome carries its start anyway)."""
        if work.command is None or work.started is None:
            return
        try:
            await self._runs.report_started(work.command, work.attempt, work.started)
        except TransientError as exc:
            log.warning(
                "fetch.started_unreported",
                extra={"run_id": work.command.run_id, "error": str(exc)},
            )

    async def _process(self, work: _Work) -> None:
        msg = work.msg
        try:
            command = decode_command(msg, msg.subject)
        except PoisonMessage as poison:
            await self._events.poison(msg, poison)
            return
        work.command = command
        # Every delivery of this message is an attempt (a command set aside is acked, never
        # handed back), on top of those made before it was set aside.
        work.attempt = command.attempts_done + deliveries(msg)
        with spans.consumer_span(
            msg.subject,
            msg.headers,
            consumer=self._bus.subjects.fetcher_consumer,
            source=command.source,
            run_id=command.run_id,
            message_id=command.run_id,
            body_size=len(msg.data),
        ):
            source = self._settings.source(command.source)
            if source is None:
                await self._events.fail(
                    msg,
                    command,
                    work.attempt,
                    "unknown_source",
                    f"source {command.source[:MAX_ECHO]!r} is not configured",
                )
                return
            await self._one_at_a_time(work, command, source)

    async def _one_at_a_time(
        self, work: _Work, command: CollectCommand, source: SourceConfig
    ) -> None:
        """Run ``command`` unless its source is running (here, or in another process with the
        lease): then set it aside until the source is free."""
        if source.allow_overlap or self._leases is None:
            work.started = Started()
            await self._runs.run(work.msg, command, source, work.attempt, work.started)
            return
        deferrals = self._deferrals
        back = deferrals.brought_back(work.msg, source.name)
        if self._running.get(source.name):
            await deferrals.defer(work.msg, command, work.attempt, "running in this process")
            if not self._running.get(source.name):  # the run ended while this was set aside
                await deferrals.next(source.name)
            return
        if not back and deferrals.ahead(source.name):
            # Earlier commands of the source wait: this one goes behind them, the oldest comes
            # back (a command seen late keeps its place in the source's order).
            await deferrals.defer(work.msg, command, work.attempt, "behind earlier commands")
            await deferrals.next(source.name)
            return
        lease = await self._leases.acquire(source.name, command.run_id)
        if lease is None:
            why = "running in another process"
            await self._deferrals.defer(work.msg, command, work.attempt, why)
            return
        work.lease = lease
        self._running[source.name] = 1
        try:
            work.started = Started()
            await self._runs.run(work.msg, command, source, work.attempt, work.started)
        finally:
            work.lease = None
            self._running.pop(source.name, None)
            with anyio.CancelScope(shield=True):
                await self._leases.release(lease)
        # The source's next deferred command, if any (when this fails, the sweep does it).
        await deferrals.next(source.name)


async def _settle(action: Callable[[], Awaitable[object]]) -> None:
    """Ack/nak without letting a dead connection turn shutdown into a crash."""
    await settle(action, log=log, event="fetch.settle_failed")


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception inside task-group wrappers, for a readable log line."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
