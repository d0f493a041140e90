"""The request-reply service: status, trigger, runs, health, dead-letter replay, backfill and
its progress, for ``nats req`` and the CLI.

A NATS micro service named after the bus prefix (``coleta``), so ``$SRV.PING``, ``$SRV.INFO``
and ``$SRV.STATS`` discover it. A bad request gets an error reply — the micro
``Nats-Service-Error`` / ``Nats-Service-Error-Code`` headers plus an ``ErrorReply`` body with a
stable code — and the service keeps serving. Internal errors are logged, never echoed.

Whatever a request holds, the reply fits in one NATS message (a reply over ``max_payload``
would cost the connection, and with it the daemon): a request over ``_REQUEST_BYTES`` is
refused unread, an error message is one short line that repeats at most 80 characters of any
value (``_replies``), and the status and runs lists come in pages filled up to half of
``max_payload`` (a reply's ``next`` is the next request's ``after``). Whatever goes wrong
inside, the reply is a 500 ``internal`` and the log says where, never with a traceback.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats import micro
from nats.micro.request import Request
from nats.micro.service import Service as MicroService

from contracts import ComponentHealth, ErrorDetail, ErrorReply, encode
from daemon import __version__
from daemon.errors import BusUnavailable, ServiceFailure, nats_errors
from daemon.platform.bus import Bus
from daemon.platform.clock import Clock, SystemClock
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.platform.redact import redact_json, redact_text
from daemon.service._endpoints import Endpoints
from daemon.service._replies import one_line
from daemon.settings import Settings

__all__ = ["Service"]

log = get_logger("service")

KIB = 1024
#: Largest request an endpoint reads; ``backfill.progress`` (up to 10,000 run ids) takes
#: whatever NATS delivers.
_REQUEST_BYTES = 64 * KIB
_UNBOUNDED_REQUESTS = frozenset({"backfill.progress"})
#: What a single reply may use of ``max_payload`` when it cannot be paged (headers aside).
_HEADROOM = 4 * KIB


class Service:
    """Serves ``<prefix>.<endpoint>`` for each of ``contracts.ENDPOINTS`` (``Endpoints``)."""

    def __init__(
        self, bus: Bus, db: Database, settings: Settings, *, clock: Clock | None = None
    ) -> None:
        self._bus = bus
        self._endpoints = Endpoints(
            bus, db, settings, clock=clock or SystemClock(), headroom=_HEADROOM
        )

    def reload(self, settings: Settings) -> None:
        """Answer for these sources from now on (SIGHUP)."""
        self._endpoints.reload(settings)

    def watch(self, name: str, check: Callable[[], ComponentHealth]) -> None:
        """Report ``check()`` as ``name`` among the health checks (the worker processes)."""
        self._endpoints.dependencies.watch(name, check)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; beside it, keep the sources' freshness gauges up to date
        (``FreshnessWatch.sample_forever``: the service role is the one that reports them)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._endpoints.freshness.sample_forever, name="service-freshness")
            await tg.start(self._serve, name="service-endpoints")
            task_status.started()

    async def _serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self._bus.subjects
        svc = await micro.add_service(
            self._bus.nc,
            name=s.service_name,
            version=__version__,
            description="coleta: scheduled HTTP collection into PostgreSQL",
        )
        try:
            for name, handler in self._endpoints.handlers().items():
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
                    with nats_errors("stopping the service"):
                        await svc.stop()
                except BusUnavailable as exc:
                    log.warning("service.stop_failed", extra={"error": str(exc)})

    def _wrap(
        self,
        svc: MicroService,
        endpoint: str,
        handler: Callable[[bytes], Awaitable[msgspec.Struct]],
    ) -> Callable[[Request], Awaitable[None]]:
        limit = None if endpoint in _UNBOUNDED_REQUESTS else _REQUEST_BYTES

        async def handle(request: Request) -> None:
            data = request.data
            try:
                if limit is not None and len(data) > limit:
                    raise ServiceFailure(
                        "too_large",
                        f"request too large: {endpoint} takes at most {limit:,} bytes"
                        f" (got {len(data):,})",
                    )
                payload = redact_json(encode(await handler(data)))  # a run's error, a detail
                if len(payload) > self._bus.max_payload - _HEADROOM:  # a bug: pages fit
                    log.error(
                        "service.reply_too_large",
                        extra={"endpoint": endpoint, "bytes": len(payload)},
                    )
                    raise ServiceFailure(
                        "internal",
                        f"{endpoint}: the reply ({len(payload):,} bytes) would not fit in a"
                        f" NATS message ({self._bus.max_payload:,})",
                    )
            except ServiceFailure as exc:
                await _respond_error(svc, endpoint, request, exc.code, exc.message)
                return
            except Exception as exc:  # RecursionError, MemoryError, a bug: answer, keep serving
                # No traceback and no message: either could carry a secret or the request.
                log.error(
                    "service.internal",
                    extra={"endpoint": endpoint, "error_type": type(exc).__name__, **_where(exc)},
                )
                message = f"{endpoint} failed ({type(exc).__name__}); see the daemon log"
                await _respond_error(svc, endpoint, request, "internal", message)
                return
            try:
                with nats_errors("replying"):
                    await request.respond(payload)
            except BusUnavailable as exc:
                log.warning("service.reply_failed", extra={"error": str(exc)})

        return handle


def _where(exc: BaseException) -> dict[str, str]:
    """Where an unexpected error was raised: file, line and function, nothing it held."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return {}
    last = frames[-1]
    return {"where": f"{Path(last.filename).name}:{last.lineno} in {last.name}"}


async def _respond_error(
    svc: MicroService, endpoint: str, request: Request, code: str, message: str
) -> None:
    message = redact_text(one_line(message))
    body = encode(ErrorReply(error=ErrorDetail(code=code, message=message)))
    status = ServiceFailure(code, message).status
    # nats-py counts only raised errors in $SRV.STATS; an error we answer is counted here.
    count_service_error(svc, endpoint.replace(".", "_"), status, message)
    try:
        with nats_errors("replying"):
            await request.respond_error(status, message, data=body)
    except BusUnavailable as exc:
        log.warning("service.reply_failed", extra={"error": str(exc)})


def count_service_error(service: MicroService, endpoint: str, code: str, message: str) -> None:
    """Count an error reply in ``$SRV.STATS`` (``nats micro stats``) for ``endpoint``.

    nats-py counts an error only when the handler raises, and then answers by itself with an
    empty body and ``repr(exc)``. A handler that answers with ``request.respond_error`` (to
    send a body) leaves ``num_errors`` at 0, unlike the Go micro library, whose
    ``Request.Error`` counts. nats-py has no public hook for this, hence the private
    attributes; if they change, this does nothing rather than fail the reply.
    """
    endpoints: Any = getattr(service, "_endpoints", ())
    for found in endpoints:
        if getattr(found, "_name", None) != endpoint or not hasattr(found, "_num_errors"):
            continue
        found._num_errors += 1
        found._last_error = f"{code}:{message}"  # what nats-py stores for a ServiceError
        return
