"""The request-reply service: status, trigger, runs and health, for ``nats req`` and the CLI.

A NATS micro service named after the bus prefix (``coleta``), so ``$SRV.PING``, ``$SRV.INFO``
and ``$SRV.STATS`` discover it. A bad request gets an error reply — the micro
``Nats-Service-Error`` / ``Nats-Service-Error-Code`` headers plus an ``ErrorReply`` body with a
stable code — and the service keeps serving. Internal errors are logged, never echoed.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import anyio
import msgspec
import nats.errors
import psycopg
from anyio.abc import TaskStatus
from nats import micro
from nats.micro.request import Request
from nats.micro.service import Service as MicroService
from psycopg_pool import PoolTimeout

from contracts import (
    BackfillReply,
    BackfillRequest,
    ComponentHealth,
    DayMark,
    DlqReplayReply,
    DlqReplayRequest,
    ErrorDetail,
    ErrorReply,
    HealthReply,
    RunProgressReply,
    RunProgressRequest,
    RunsReply,
    RunsRequest,
    SourceStatus,
    StatusReply,
    TriggerReply,
    TriggerRequest,
    encode,
)
from daemon import __version__, _backfill, _deadletters, _metrics
from daemon._bus import Bus
from daemon._db import Database
from daemon._history import SourceSummary, daily_outcomes, recent_runs, source_summaries
from daemon._logging import get_logger
from daemon._queue import queue_run
from daemon._schedule import run_id_for
from daemon.errors import TransientError
from daemon.settings import Settings

__all__ = ["Service", "ServiceFailure"]

log = get_logger("service")

T = TypeVar("T")

#: Each dependency check of status/health answers within this long.
_CHECK_TIMEOUT_S = 2.0

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


class ServiceFailure(Exception):
    """A request that cannot be answered; becomes an error reply with a stable code."""

    STATUS = {"bad_request": "400", "unknown_source": "404", "unavailable": "503"}

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Service:
    """Serves ``<prefix>.status|trigger|runs|health``."""

    def __init__(self, bus: Bus, db: Database, settings: Settings) -> None:
        self._bus = bus
        self._db = db
        self._settings = settings
        self._started = anyio.current_time()

    def reload(self, settings: Settings) -> None:
        """Answer for these sources from now on (SIGHUP)."""
        self._settings = settings

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self._bus.subjects
        svc = await micro.add_service(
            self._bus.nc,
            name=s.service_name,
            version=__version__,
            description="coleta: scheduled HTTP collection into PostgreSQL",
        )
        try:
            for name, handler in (
                ("status", self._status),
                ("trigger", self._trigger),
                ("runs", self._runs),
                ("health", self._health),
                ("dlq.replay", self._dlq_replay),
                ("backfill", self._backfill),
                ("backfill.progress", self._progress),
            ):
                await svc.add_endpoint(
                    name=name.replace(".", "_"),
                    subject=s.endpoint(name),
                    handler=self._wrap(svc, name, handler),
                )
            await self._bus.nc.flush()
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await svc.stop()
                except nats.errors.Error as exc:
                    log.warning("service.stop_failed", extra={"error": str(exc)})

    def _wrap(
        self,
        svc: MicroService,
        endpoint: str,
        handler: Callable[[bytes], Awaitable[msgspec.Struct]],
    ) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            try:
                reply = await handler(request.data)
            except ServiceFailure as exc:
                await _respond_error(svc, endpoint, request, exc.code, exc.message)
                return
            except Exception:
                log.exception("service.failed", extra={"endpoint": endpoint})
                message = f"{endpoint} failed; see the daemon log"
                await _respond_error(svc, endpoint, request, "internal", message)
                return
            await request.respond(encode(reply))

        return handle

    # -- endpoints ---------------------------------------------------------------------------

    async def _status(self, data: bytes) -> StatusReply:
        now = datetime.now(UTC)
        bus, database = await self._checks()
        sources = self._settings.sources
        summaries: dict[str, SourceSummary] = {}
        days: dict[str, list[DayMark]] = {}
        if database.ok:
            names = [src.name for src in sources]
            try:
                summaries = await source_summaries(self._db, names)
                days = await daily_outcomes(self._db, names, now.date())
            except (psycopg.Error, PoolTimeout) as exc:
                database = ComponentHealth(ok=False, detail=_first_line(exc))
        try:
            dead = await _deadletters.counts(self._bus) if bus.ok else {}
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("status.dlq_count_failed", extra={"error": str(exc)})
            dead = {}
        out = []
        for src in sources:
            summary = summaries.get(src.name)
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
                )
            )
        return StatusReply(
            version=__version__,
            uptime_s=round(anyio.current_time() - self._started, 3),
            bus=bus,
            database=database,
            sources=out,
        )

    async def _trigger(self, data: bytes) -> TriggerReply:
        request = _parse_trigger(data)
        source = self._settings.source(request.source)
        if source is None:
            known = ", ".join(s.name for s in self._settings.sources) or "none"
            raise ServiceFailure(
                "unknown_source", f"unknown source {request.source!r} (configured: {known})"
            )
        now = datetime.now(UTC)
        scheduled_for = request.scheduled_for or now
        run_id = run_id_for(source.name, scheduled_for, suffix=f"manual-{secrets.token_hex(3)}")
        try:
            await queue_run(
                self._bus, source, scheduled_for, run_id=run_id, trigger="manual", now=now
            )
        except TransientError as exc:
            raise ServiceFailure("unavailable", f"could not queue the run: {exc}") from exc
        log.info("trigger.queued", extra={"source": source.name, "run_id": run_id})
        return TriggerReply(run_id=run_id, source=source.name, scheduled_for=scheduled_for)

    async def _runs(self, data: bytes) -> RunsReply:
        request = _decode(data, RunsRequest, empty=RunsRequest())
        if request.source is not None and self._settings.source(request.source) is None:
            raise ServiceFailure("unknown_source", f"unknown source {request.source!r}")
        try:
            runs = await recent_runs(self._db, source=request.source, limit=request.limit)
        except (psycopg.Error, PoolTimeout) as exc:
            raise ServiceFailure("unavailable", f"database: {_first_line(exc)}") from exc
        return RunsReply(runs=runs)

    async def _dlq_replay(self, data: bytes) -> DlqReplayReply:
        request = _decode(data, DlqReplayRequest, empty=DlqReplayRequest())
        if request.source is not None and self._settings.source(request.source) is None:
            raise ServiceFailure("unknown_source", f"unknown source {request.source!r}")
        try:
            replayed = await _deadletters.replay(
                self._bus, source=request.source, run_id=request.run_id
            )
        except (TransientError, nats.errors.Error, TimeoutError) as exc:
            raise ServiceFailure("unavailable", f"could not replay: {exc}") from exc
        return DlqReplayReply(replayed=len(replayed), run_ids=replayed)

    async def _backfill(self, data: bytes) -> BackfillReply:
        if not data.strip():
            raise ServiceFailure(
                "bad_request", 'empty request: send {"source": …, "start": …, "end": …}'
            )
        request = _decode(data, BackfillRequest, empty=BackfillRequest(source="", start="", end=""))
        source = self._settings.source(request.source)
        if source is None:
            known = ", ".join(s.name for s in self._settings.sources) or "none"
            raise ServiceFailure(
                "unknown_source", f"unknown source {request.source!r} (configured: {known})"
            )
        try:
            first, last = _backfill.parse_range(source, request.start, request.end)
            # Up to 10,000 croniter steps take most of a second: not on the event loop.
            slots = await anyio.to_thread.run_sync(_backfill.slots_between, source, first, last)
        except ValueError as exc:
            raise ServiceFailure("bad_request", str(exc)) from exc
        try:
            recorded = await _backfill.slot_runs(self._db, source.name, first, last)
        except (psycopg.Error, PoolTimeout) as exc:
            raise ServiceFailure("unavailable", f"database: {_first_line(exc)}") from exc
        plan = _backfill.plan_backfill(
            source, slots, recorded, first=first, last=last, force=request.force
        )
        try:
            queued = await _backfill.queue_backfill(self._bus, source, plan, datetime.now(UTC))
        except TransientError as exc:
            raise ServiceFailure("unavailable", f"could not queue the runs: {exc}") from exc
        return BackfillReply(
            source=source.name,
            start=first,
            end=last,
            slots=len(slots),
            queued=len(queued),
            skipped=len(plan.skipped),
            run_ids=queued,
            skipped_run_ids=[run_id for _, run_id in plan.skipped],
        )

    async def _progress(self, data: bytes) -> RunProgressReply:
        request = _decode(data, RunProgressRequest, empty=RunProgressRequest(run_ids=[]))
        try:
            counts = await _backfill.run_progress(self._db, request.run_ids)
        except (psycopg.Error, PoolTimeout) as exc:
            raise ServiceFailure("unavailable", f"database: {_first_line(exc)}") from exc
        return RunProgressReply(total=len(set(request.run_ids)), counts=counts)

    async def _health(self, data: bytes) -> HealthReply:
        bus, database = await self._checks()
        checks = {"bus": bus, "database": database}
        failing = [f"{name}: {check.detail}" for name, check in checks.items() if not check.ok]
        if failing:
            return HealthReply(status="degraded", reason="; ".join(failing), checks=checks)
        return HealthReply(status="ok", checks=checks)

    async def _checks(self) -> tuple[ComponentHealth, ComponentHealth]:
        bus = ComponentHealth(ok=True, detail="connected")
        if not self._bus.connected:
            bus = ComponentHealth(ok=False, detail="not connected to NATS")
        else:
            try:
                # Bounded, so a health request is answered well within a client's timeout.
                with anyio.fail_after(_CHECK_TIMEOUT_S):
                    await self._bus.js.stream_info(self._bus.subjects.raw_stream)
            except TimeoutError:
                bus = ComponentHealth(
                    ok=False, detail=f"JetStream: no answer within {_CHECK_TIMEOUT_S:g} s"
                )
            except nats.errors.Error as exc:
                bus = ComponentHealth(ok=False, detail=f"JetStream: {exc or type(exc).__name__}")
        problem = await self._db.ping()
        database = ComponentHealth(ok=problem is None, detail=problem or "reachable")
        return bus, database


def _decode(data: bytes, type_: type[T], *, empty: T) -> T:
    if not data.strip():
        return empty
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise ServiceFailure("bad_request", f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ServiceFailure("bad_request", f"malformed JSON: {exc}") from exc


def _parse_trigger(data: bytes) -> TriggerRequest:
    """A JSON object, a JSON string, or a bare source name."""
    text = data.strip()
    if not text:
        raise ServiceFailure("bad_request", 'empty request: send {"source": "<name>"}')
    if text[:1] not in (b"{", b'"', b"["):
        name = text.decode("utf-8", "replace")
        if set(name) <= _NAME_CHARS:
            return TriggerRequest(source=name)
        raise ServiceFailure(
            "bad_request", f'malformed request {name[:80]!r}: send {{"source": "<name>"}}'
        )
    if text[:1] == b'"':
        try:
            return TriggerRequest(source=msgspec.json.decode(text, type=str))
        except msgspec.DecodeError as exc:
            raise ServiceFailure("bad_request", f"malformed JSON: {exc}") from exc
    return _decode(text, TriggerRequest, empty=TriggerRequest(source=""))


async def _respond_error(
    svc: MicroService, endpoint: str, request: Request, code: str, message: str
) -> None:
    body = encode(ErrorReply(error=ErrorDetail(code=code, message=message)))
    status = ServiceFailure.STATUS.get(code, "500")
    # nats-py counts only raised errors in $SRV.STATS; an error we answer is counted here.
    _metrics.count_service_error(svc, endpoint.replace(".", "_"), status, message)
    try:
        await request.respond_error(status, message, data=body)
    except nats.errors.Error as exc:
        log.warning("service.reply_failed", extra={"error": str(exc)})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
