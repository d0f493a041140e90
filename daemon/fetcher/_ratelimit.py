"""Per-host request pacing, shared by every fetch of the process.

Each host has one gate. A source's ``rate_limit`` (``"5/s"``) spaces requests to its host
evenly — at most one per ``1/5`` s, so no 1-second window holds more than 5 — and every
source of that host shares it (the strictest configured rate wins). The API can ask for more
room, and the gate then holds the host for everyone:

* ``Retry-After`` on a 429 or 503 (seconds or an HTTP date);
* ``RateLimit-Remaining: 0`` with ``RateLimit-Reset``, or the ``X-RateLimit-*`` pair, where the
  reset is seconds from now or a Unix time.

The gate sits on the shared httpx client as request/response event hooks (``_client``),
so every request — each page, a retry after a 401, any redirect — passes it. A source's rate
travels with its request in ``request.extensions[RATE_EXTENSION]`` (set by ``build_request``);
a request without it (a next-page URL built elsewhere) uses the rate its host already has.
Waiting uses the event loop's monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import anyio

from daemon.platform.logs import get_logger

__all__ = ["RATE_EXTENSION", "HostGates", "reset_after"]

log = get_logger("ratelimit")

#: ``request.extensions`` key carrying the least seconds between two requests to its host.
RATE_EXTENSION = "coleta.rate_interval_s"
#: Longest hold the API may ask for; past it the host is held this long.
MAX_HOLD_S = 15 * 60.0
#: A reset larger than this is a Unix time, not a number of seconds.
_EPOCH_THRESHOLD = 1_000_000_000


@dataclass(slots=True)
class _Gate:
    #: Least seconds between two requests (0: unlimited).
    interval_s: float = 0.0
    #: Monotonic time before which no request may start (pacing).
    next_free: float = 0.0
    #: Monotonic time before which the API asked us to stay away.
    held_until: float = 0.0


class HostGates:
    """One gate per host: pacing from ``rate_limit`` plus holds the API asks for."""

    def __init__(self) -> None:
        self._gates: dict[str, _Gate] = {}

    def _gate(self, host: str) -> _Gate:
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = _Gate()
        return gate

    async def acquire(self, host: str, interval_s: float | None = None) -> float:
        """Wait until a request to ``host`` may start; returns the seconds waited."""
        gate = self._gate(host)
        if interval_s:
            gate.interval_s = max(gate.interval_s, interval_s)
        started = anyio.current_time()
        while True:
            now = anyio.current_time()
            ready = max(gate.next_free, gate.held_until)
            if ready <= now:
                gate.next_free = now + gate.interval_s
                return now - started
            # No reservation: whoever wakes first takes the turn, the others wait again.
            await anyio.sleep(ready - now)

    def hold(self, host: str, seconds: float) -> None:
        """Send nothing to ``host`` for ``seconds`` (capped at ``MAX_HOLD_S``)."""
        if seconds <= 0:
            return
        until = anyio.current_time() + min(seconds, MAX_HOLD_S)
        gate = self._gate(host)
        if until > gate.held_until:
            gate.held_until = until
            hold_s = round(min(seconds, MAX_HOLD_S), 3)
            log.info("ratelimit.hold", extra={"host": host, "hold_s": hold_s})


def reset_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds until the quota resets when ``(X-)RateLimit-Remaining`` says none is left.

    ``headers`` must be case-insensitive (httpx's are). ``now`` is the Unix time (tests).
    """
    for prefix in ("ratelimit-", "x-ratelimit-"):
        remaining = headers.get(prefix + "remaining")
        if remaining is None or remaining.strip() not in ("0", "0.0"):
            continue
        reset = _number(headers.get(prefix + "reset"))
        if reset is None:
            return None
        if reset > _EPOCH_THRESHOLD:
            reset -= time.time() if now is None else now
        return max(0.0, reset)
    return None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
