"""The service's endpoints: each decodes its request and builds its reply.

Replies are built from PostgreSQL and JetStream, not from process memory, so every replica
answers the same (``_history``, ``_health``, ``_dead_letters``). A request that cannot be
answered raises ``ServiceFailure`` with a stable code: ``bad_request`` (what it holds),
``unknown_source``, ``unavailable`` (the database or the bus, for now).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime

import anyio
import msgspec

from contracts import (
    BackfillReply,
    BackfillRequest,
    ComponentHealth,
    DlqReplayReply,
    DlqReplayRequest,
    HealthReply,
    RunInfo,
    RunProgressReply,
    RunProgressRequest,
    RunsReply,
    RunsRequest,
    SourceStatus,
    StatusReply,
    StatusRequest,
    TriggerReply,
    encode,
)
from daemon import __version__
from daemon.errors import (
    PermanentError,
    ServiceFailure,
    StoreRejected,
    StoreUnavailable,
    TransientError,
    psycopg_errors,
)
from daemon.ids import manual_run_id
from daemon.platform.bus import Bus
from daemon.platform.clock import Clock
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.service import _backfill, _dead_letters
from daemon.service._freshness import (
    Freshness,
    FreshnessWatch,
    SourcesHealth,
    freshness_windows,
)
from daemon.service._health import CHECK_TIMEOUT_S, Dependencies
from daemon.service._history import daily_outcomes, recent_runs, source_summaries
from daemon.service._replies import Page, decode, echo, parse_trigger, sql_text
from daemon.settings import Settings, SourceConfig
from daemon.ticker import queue_run

__all__ = ["Endpoints"]

log = get_logger("service")

#: Source names an ``unknown source`` message lists.
_KNOWN_SHOWN = 10
#: Sources whose history one query reads while a status page fills.
_STATUS_CHUNK = 100


class Endpoints:
    """The handler of each of ``contracts.ENDPOINTS`` (``handlers``)."""

    def __init__(
        self, bus: Bus, db: Database, settings: Settings, *, clock: Clock, headroom: int
    ) -> None:
        self._bus = bus
        self._db = db
        self.settings = settings
        self._started = anyio.current_time()
        self.dependencies = Dependencies(bus, db)
        self.freshness = FreshnessWatch(db, clock, settings)
        #: What a single reply may use of ``max_payload`` when it cannot be paged.
        self._headroom = headroom

    def reload(self, settings: Settings) -> None:
        """Answer for these sources from now on (SIGHUP)."""
        self.settings = settings
        self.freshness.reload(settings)

    def handlers(self) -> dict[str, Callable[[bytes], Awaitable[msgspec.Struct]]]:
        """Each endpoint's handler, by name (``contracts.ENDPOINTS``)."""
        return {
            "status": self.status,
            "trigger": self.trigger,
            "runs": self.runs,
            "health": self.health,
            "dlq.replay": self.dlq_replay,
            "backfill": self.backfill,
            "backfill.progress": self.progress,
        }

    @property
    def _page_bytes(self) -> int:
        """A page of status or runs is filled up to half the server's ``max_payload``."""
        return self._bus.max_payload // 2

    async def status(self, data: bytes) -> StatusReply:
        request = decode(data, StatusRequest, empty=StatusRequest())
        sources = self.settings.sources
        if request.source is not None:
            sources = [src for src in sources if src.name == request.source]
            if not sources:
                raise self._unknown_source(request.source)
        start = 0
        if request.after is not None:
            names = [src.name for src in sources]
            if request.after not in names:
                raise ServiceFailure(
                    "bad_request",
                    f"after: no source {echo(request.after)} (the configuration changed?);"
                    " ask again without after",
                )
            start = names.index(request.after) + 1
        now = self.freshness.now()
        dead: dict[str, int] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._dead_letters_into, dead, name="status-dead-letters")
            checks = await self.dependencies.check()
        bus, database = checks.bus_summary(), checks.database
        rest = sources[start:]
        envelope = StatusReply(
            version=__version__,
            uptime_s=round(anyio.current_time() - self._started, 3),
            bus=bus,
            database=database,
            sources=[],
            next="n" * max((len(src.name) for src in rest), default=0),
        )
        page: Page[SourceStatus] = Page(self._page_bytes - len(encode(envelope)))
        for offset in range(0, len(rest), _STATUS_CHUNK):
            chunk = rest[offset : offset + _STATUS_CHUNK]
            statuses, database = await self._source_statuses(chunk, now, database, dead)
            if not page.extend(statuses):
                break
        more = len(page.items) < len(rest)
        return msgspec.structs.replace(
            envelope,
            database=database,
            sources=page.items,
            next=page.items[-1].name if more else None,
        )

    async def _source_statuses(
        self,
        chunk: Sequence[SourceConfig],
        now: datetime,
        database: ComponentHealth,
        dead: dict[str, int],
    ) -> tuple[list[SourceStatus], ComponentHealth]:
        """These sources' statuses; history is left out once the database fails to answer."""
        names = [src.name for src in chunk]
        summaries, days = {}, {}
        windows = await freshness_windows(chunk)
        if database.ok:
            try:
                with psycopg_errors():
                    summaries = await source_summaries(self._db, names)
                    days = await daily_outcomes(self._db, names, now.date())
            except (StoreUnavailable, StoreRejected) as exc:
                database = ComponentHealth(ok=False, detail=str(exc))
        out = []
        for src, window in zip(chunk, windows, strict=True):
            summary = summaries.get(src.name)
            judged: Freshness | None = None
            if summary is not None:
                judged = self.freshness.judge(src, summary.history, window, now)
            out.append(
                SourceStatus(
                    name=src.name,
                    schedule=src.schedule,
                    timezone=src.timezone,
                    next_run=src.cron.next_after(now) if src.enabled else None,
                    last_run=summary.last_run if summary else None,
                    consecutive_failures=summary.consecutive_failures if summary else 0,
                    rows=summary.rows if summary else 0,
                    dead_letters=dead.get(src.name, 0),
                    days=days.get(src.name, []),
                    freshness_age_s=round(judged.age_s, 3) if judged else None,
                    freshness_s=window if math.isfinite(window) else None,
                    late=judged.late if judged else False,
                    failing=judged.failing if judged else False,
                )
            )
        return out, database

    async def _dead_letters_into(self, out: dict[str, int]) -> None:
        if not self._bus.connected:
            return
        try:
            with anyio.fail_after(CHECK_TIMEOUT_S):
                out.update(await _dead_letters.counts(self._bus))
        except (TransientError, TimeoutError) as exc:
            log.warning("status.dlq_count_failed", extra={"error": str(exc)})

    async def trigger(self, data: bytes) -> TriggerReply:
        request = parse_trigger(data)
        source = self.settings.source(request.source)
        if source is None:
            raise self._unknown_source(request.source)
        now = datetime.now(UTC)
        scheduled_for = request.scheduled_for or now
        run_id = manual_run_id(source.name, scheduled_for)
        try:
            await queue_run(
                self._bus, source, scheduled_for, run_id=run_id, trigger="manual", now=now
            )
        except TransientError as exc:
            raise ServiceFailure("unavailable", f"could not queue the run: {exc}") from exc
        # Per run: debug (a burst of triggers would log one line each).
        log.debug("trigger.queued", extra={"source": source.name, "run_id": run_id})
        return TriggerReply(run_id=run_id, source=source.name, scheduled_for=scheduled_for)

    async def runs(self, data: bytes) -> RunsReply:
        request = decode(data, RunsRequest, empty=RunsRequest())
        if request.source is not None and self.settings.source(request.source) is None:
            raise ServiceFailure("unknown_source", f"unknown source {echo(request.source)}")
        after = sql_text("after", request.after)
        try:
            # One more than asked: whether more follow decides ``next``.
            with _database():
                runs = await recent_runs(
                    self._db, source=request.source, limit=request.limit + 1, after=after
                )
        except LookupError:
            raise ServiceFailure(
                "bad_request",
                f"after: no run {echo(request.after or '')} (pruned?); ask again without after",
            ) from None
        wanted = runs[: request.limit]
        envelope = RunsReply(runs=[], next="r" * max((len(r.run_id) for r in wanted), default=0))
        page: Page[RunInfo] = Page(self._page_bytes - len(encode(envelope)))
        page.extend(wanted)
        more = len(runs) > len(page.items)
        return RunsReply(runs=page.items, next=page.items[-1].run_id if more else None)

    async def dlq_replay(self, data: bytes) -> DlqReplayReply:
        request = decode(data, DlqReplayRequest, empty=DlqReplayRequest())
        if request.source is not None and self.settings.source(request.source) is None:
            raise ServiceFailure("unknown_source", f"unknown source {echo(request.source)}")
        try:
            replayed = await _dead_letters.replay(
                self._bus, source=request.source, run_id=request.run_id
            )
        except (TransientError, PermanentError) as exc:
            raise ServiceFailure("unavailable", f"could not replay: {exc}") from exc
        return DlqReplayReply(replayed=len(replayed), run_ids=replayed)

    async def backfill(self, data: bytes) -> BackfillReply:
        if not data.strip():
            raise ServiceFailure(
                "bad_request", 'empty request: send {"source": …, "start": …, "end": …}'
            )
        request = decode(data, BackfillRequest, empty=BackfillRequest(source="", start="", end=""))
        source = self.settings.source(request.source)
        if source is None:
            raise self._unknown_source(request.source)
        try:
            first, last = _backfill.parse_range(source, request.start, request.end)
            # Up to 10,000 croniter steps take most of a second: not on the event loop.
            slots = await anyio.to_thread.run_sync(_backfill.slots_between, source, first, last)
        except ValueError as exc:
            raise ServiceFailure("bad_request", str(exc)) from exc
        with _database():
            recorded = await _backfill.slot_runs(self._db, source.name, first, last)
        plan = _backfill.plan_backfill(
            source, slots, recorded, first=first, last=last, force=request.force
        )
        reply = BackfillReply(
            source=source.name,
            start=first,
            end=last,
            slots=len(slots),
            queued=len(plan.run),
            skipped=len(plan.skipped),
            run_ids=[run_id for _, run_id in plan.run],
            skipped_run_ids=[run_id for _, run_id in plan.skipped],
        )
        # Checked before anything is queued: the reply is the caller's only list of run ids.
        if len(encode(reply)) > self._bus.max_payload - self._headroom:
            raise ServiceFailure(
                "bad_request",
                f"the run ids of {len(slots):,} slots would not fit in one reply;"
                " split the range into smaller ones",
            )
        try:
            queued = await _backfill.queue_backfill(self._bus, source, plan, datetime.now(UTC))
        except TransientError as exc:
            raise ServiceFailure("unavailable", f"could not queue the runs: {exc}") from exc
        return msgspec.structs.replace(reply, queued=len(queued), run_ids=queued)

    async def progress(self, data: bytes) -> RunProgressReply:
        request = decode(data, RunProgressRequest, empty=RunProgressRequest(run_ids=[]))
        for i, run_id in enumerate(request.run_ids):
            sql_text(f"run_ids[{i}]", run_id)
        with _database():
            counts = await _backfill.run_progress(self._db, request.run_ids)
        return RunProgressReply(total=len(set(request.run_ids)), counts=counts)

    async def health(self, data: bytes) -> HealthReply:
        sources: SourcesHealth | None = None
        problem = ""

        async def judge_sources() -> None:
            nonlocal sources, problem
            try:
                with anyio.fail_after(CHECK_TIMEOUT_S):
                    sources = SourcesHealth.of(await self.freshness.evaluate())
            except TimeoutError:
                problem = f"not checked: no answer within {CHECK_TIMEOUT_S:g} s"
            except (StoreUnavailable, StoreRejected) as exc:
                problem = f"not checked: {exc}"

        async with anyio.create_task_group() as tg:
            tg.start_soon(judge_sources, name="health-sources")
            found = await self.dependencies.check()
        checks = found.entries()
        if sources is not None:
            checks["sources"] = sources.check
        elif found.database.ok:  # a database that is down is named once, as ``database``
            checks["sources"] = ComponentHealth(ok=False, detail=problem)
        failing = [f"{name}: {check.detail}" for name, check in checks.items() if not check.ok]
        return HealthReply(
            status="degraded" if failing else "ok",
            reason="; ".join(failing),
            checks=checks,
            late=sources.late if sources else [],
            failing=sources.failing if sources else [],
        )

    def _unknown_source(self, name: str) -> ServiceFailure:
        names = [src.name for src in self.settings.sources]
        known = ", ".join(names[:_KNOWN_SHOWN]) or "none"
        if len(names) > _KNOWN_SHOWN:
            known += f", … ({len(names) - _KNOWN_SHOWN:,} more)"
        return ServiceFailure(
            "unknown_source", f"unknown source {echo(name)} (configured: {known})"
        )


@contextlib.contextmanager
def _database() -> Iterator[None]:
    """Around a read of the run history: PostgreSQL not answering is ``unavailable``."""
    try:
        with psycopg_errors():
            yield
    except (StoreUnavailable, StoreRejected) as exc:
        raise ServiceFailure("unavailable", f"database: {exc}") from exc
