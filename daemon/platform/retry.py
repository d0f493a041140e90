"""Retries inside the process: one policy type and one loop.

``Backoff`` is the policy: exponential from ``first_s``, doubling up to ``cap_s``, with full
jitter when asked (uniform in ``[0, delay]``, so many retrying at once spread out). It also
gives the delay of a retry that is not a loop here: the fetcher's hand-back of a command
(``nak`` with a delay), a held dead letter's next try.

``retry`` is the loop: it runs ``attempt`` until it returns, while ``retry_on`` (the predicate)
says the error may pass, waiting ``backoff.delay(n)`` between attempts. It gives up, raising
the last error, as soon as the next attempt would start past ``deadline``; ``on_retry`` sees
each failure before the wait (to log it and say what start-up waits for), and ``wait`` may
replace ``anyio.sleep`` (the writer's wait also ends when it is asked to stop). Every wait is
cancellable: a signal during start-up, or a shutdown, cancels the loop at once.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from daemon.errors import TransientError

__all__ = ["Backoff", "Retrying", "retry", "transient"]

T = TypeVar("T")

#: Jitter of our own: the module's global generator is everyone's (and tests seed it).
_jitter = random.Random()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits of ``first_s``, then twice as long each time, never more than ``cap_s``."""

    first_s: float
    cap_s: float
    #: Full jitter: each wait is uniform in ``[0, delay]``.
    jitter: bool = False

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1 = the first)."""
        delay = min(self.cap_s, self.first_s * 2 ** max(0, attempt - 1))
        return _jitter.uniform(0, delay) if self.jitter else delay


def transient(exc: BaseException) -> bool:
    """The usual ``retry_on``: an error of the tree that may pass (``TransientError``)."""
    return isinstance(exc, TransientError)


@dataclass(frozen=True, slots=True)
class Retrying:
    """What ``on_retry`` is told: which attempt failed, why, and how long until the next."""

    attempt: int
    error: BaseException
    delay_s: float


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: Callable[[BaseException], bool],
    backoff: Backoff,
    deadline: float | None = None,
    on_retry: Callable[[Retrying], None] | None = None,
    wait: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> T:
    """``attempt()``'s result, trying again while ``retry_on`` says its error may pass.

    ``deadline`` is on the event loop's clock (``anyio.current_time``): when the next attempt
    would start at or past it, the last error is raised instead. An error ``retry_on``
    refuses, and cancellation, leave at once.
    """
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except Exception as exc:
            if not retry_on(exc):
                raise
            delay = backoff.delay(tries)
            if deadline is not None and anyio.current_time() + delay >= deadline:
                raise
            if on_retry is not None:
                on_retry(Retrying(tries, exc, delay))
        await wait(delay)
