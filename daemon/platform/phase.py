"""What start-up is waiting for, so that a signal which interrupts it can say so.

``app.run`` installs one ``Phase`` (``watching``) before anything can block; the slow steps of
start-up — the embedded servers, the first NATS and PostgreSQL connections, the migrations
lock — name what they wait for with ``waiting_for``, and the signal task logs it::

    {"event":"daemon.signal","signal":"SIGTERM","waiting_for":"NATS at nats://… (connect retry 3)"}

The holder travels in a context variable, so code run without ``run`` (tests opening the
daemon in-process, ``coleta migrate``) updates nothing, and daemons sharing a process do not
mix their phases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["Phase", "waiting_for", "watching"]


class Phase:
    """The one thing start-up waits for right now; None once the daemon runs."""

    __slots__ = ("waiting_for",)

    def __init__(self) -> None:
        self.waiting_for: str | None = "start-up"


_current: ContextVar[Phase | None] = ContextVar("coleta_phase", default=None)


@contextlib.contextmanager
def watching() -> Iterator[Phase]:
    """A fresh phase for this task and the tasks it starts from now on."""
    phase = Phase()
    token = _current.set(phase)
    try:
        yield phase
    finally:
        _current.reset(token)


def waiting_for(what: str | None) -> None:
    """Record what start-up waits for now (None: nothing, the daemon runs)."""
    phase = _current.get()
    if phase is not None:
        phase.waiting_for = what
