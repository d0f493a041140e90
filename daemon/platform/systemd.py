"""systemd's notify protocol, without a dependency: ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a unix datagram socket (in the abstract
namespace when it starts with ``@``); each message is ``KEY=value`` lines in one datagram.
Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing. With ``WatchdogSec=``
systemd also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``): the daemon must send
``WATCHDOG=1`` more often than that, and does so every half of it, only while the bus is
connected and the database answers — a wedged daemon is restarted by systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import anyio

from daemon.platform.logs import get_logger

__all__ = ["notify", "watchdog", "watchdog_interval_s"]

log = get_logger("systemd")


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` as one notification; False when there is no socket or it failed.

    Never blocks: it runs on the event loop, and a datagram socket whose reader is behind
    (a busy or stuck manager; Linux queues 10 datagrams) would stop the whole daemon on a
    watchdog ping. A notification the queue has no room for is dropped (the next ping comes
    within half the watchdog interval)."""
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    try:
        with socket.socket(socket.AF_UNIX, flags) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except BlockingIOError:
        log.debug("systemd.notify_dropped", extra={"notification": lines[0] if lines else ""})
        return False
    except OSError as exc:
        log.warning("systemd.notify_failed", extra={"error": str(exc)})
        return False
    return True


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when the watchdog is on and meant for us."""
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1_000_000 if value > 0 else None


async def watchdog(healthy: Callable[[], Awaitable[str | None]], interval_s: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` while ``healthy()`` returns None (no problem)."""
    degraded = False
    while True:
        problem = await healthy()
        if problem is None:
            notify("WATCHDOG=1", *(["STATUS=running"] if degraded else []))
        else:
            notify(f"STATUS=degraded: {problem}")
            if not degraded:
                log.warning("systemd.watchdog_withheld", extra={"reason": problem})
        degraded = problem is not None
        await anyio.sleep(interval_s)
