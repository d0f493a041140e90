"""The line protocol between ``coleta run --workers`` and each worker process it starts.

A worker's stdin is one end of a Unix socket pair; the main process holds the other. Lines
go both ways: the main process sends ``reload`` (a SIGHUP it applied) and ``stop``; the worker
sends ``ready`` once its stages have started. End-of-file means the other side is gone: for a
worker, that its main process died (even by SIGKILL, the kernel closes its end), and it stops
as on SIGTERM, so no worker outlives its main process by more than ``shutdown_grace_s``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
from anyio.abc import ByteReceiveStream, UNIXSocketStream

__all__ = ["READY", "RELOAD", "STOP", "lines", "open_parent_channel", "send_line"]

READY = "ready"
RELOAD = "reload"
STOP = "stop"

#: Longest line a side keeps; a longer one is cut there (none of ours comes close).
_MAX_LINE = 64 * 1024


async def open_parent_channel() -> UNIXSocketStream:
    """The worker's end of the channel: its stdin, which the main process made a socket."""
    return await UNIXSocketStream.from_socket(socket.socket(fileno=0))


async def send_line(channel: UNIXSocketStream, line: str) -> bool:
    """Send one line; False when the other side is gone."""
    try:
        await channel.send(line.encode() + b"\n")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return False
    return True


async def lines(stream: ByteReceiveStream) -> AsyncIterator[str]:
    """Each line of ``stream`` (decoded leniently, without its newline) until end-of-file; a
    last line without a newline too. A broken stream ends like end-of-file."""
    pending = b""
    while True:
        try:
            chunk = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            break
        except OSError:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace").rstrip("\r")
        if len(pending) > _MAX_LINE:
            yield pending.decode(errors="replace")
            pending = b""
    if pending:
        yield pending.decode(errors="replace")
