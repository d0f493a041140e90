"""Scheduler scale: many sources on one schedule, the real clock, a ticker-only daemon.

The daemon subprocess runs ``--role ticker`` with ``N`` sources that all fire each period
(full: 10,000 on ``* * * * *``; quick: 1,000 on ``*/10 * * * * *``, catch-up off). The
benchmark subscribes to ``<prefix>.collect.>`` on plain NATS and, for each command, takes
lateness = wall-clock arrival - the command's ``scheduled_for`` (the slot). Both clocks are this
machine's, so lateness covers everything from the slot to the command being on the bus — the
ticker's wake-up, planning and every publish before it — over two consecutive slot boundaries.

Arrival is stamped when the bytes are read from the socket (``_Tap``, a bare NATS subscriber
that parses after the burst), not in a nats-py callback: nats-py parses and queues each message
before its callback runs, ~9 us a message here, so the last command of a 10,000-command burst
was stamped ~90 ms after it arrived, a bias the size of the target.

CPU is the daemon process's own (``/proc/<pid>/stat``): per boundary, from ``PREPARED_S``
before it (the ticker prepares a burst ahead of its instant) to ``SETTLE_S`` after the last
command (it ends spans and plans the next slots once the acks are in); idle, over the rest of
the time between two boundaries.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

import anyio
import msgspec
from anyio.abc import SocketStream

from bench._infra import daemon_settings, namespace, running_daemon
from bench._report import Measure, Result, percentile
from bench.scenarios._common import Context

__all__ = ["run"]

BOUNDARIES = 2
#: The CPU of a boundary counts from this long before it ...
PREPARED_S = 5.0
#: ... to this long after its last command.
SETTLE_S = 1.0


class _Command(msgspec.Struct):
    scheduled_for: datetime
    requested_at: datetime


_decode = msgspec.json.Decoder(_Command).decode


@dataclass(slots=True)
class _Tap:
    """A bare NATS subscriber: each socket read is stamped as it arrives, parsed later."""

    stream: SocketStream
    #: Unparsed bytes, and the stream offset they start at.
    buffer: bytearray = field(default_factory=bytearray)
    base: int = 0
    #: (stream offset where a read ended, wall-clock time it was read), oldest first.
    reads: list[tuple[int, float]] = field(default_factory=list)
    #: Messages seen so far, counted as they arrive (parsing waits until asked).
    seen: int = 0

    @classmethod
    async def open(cls, url: str, subject: str) -> _Tap:
        parts = urlsplit(url.split(",")[0].strip())
        stream = await anyio.connect_tcp(parts.hostname or "127.0.0.1", parts.port or 4222)
        tap = cls(stream)
        await tap._until(b"\r\n")  # INFO
        auth = (
            msgspec.json.encode({"user": parts.username, "pass": parts.password or ""})[1:-1]
            if parts.username
            else b""
        )
        connect = b'{"verbose":false,"pedantic":false,"headers":true,"name":"bench-tap"'
        connect += (b"," + auth if auth else b"") + b"}"
        await stream.send(
            b"CONNECT " + connect + b"\r\nSUB " + subject.encode() + b" 1\r\nPING\r\n"
        )
        await tap._until(b"PONG\r\n")  # subscribed
        tap.buffer.clear()
        return tap

    async def _until(self, marker: bytes) -> None:
        while marker not in self.buffer:
            self.buffer += await self.stream.receive()
            if b"-ERR" in self.buffer:
                raise RuntimeError(f"NATS refused the tap: {bytes(self.buffer)!r}")

    async def read_forever(self) -> None:
        tail = b""
        while True:
            data = await self.stream.receive(1 << 20)
            at = time.time()
            self.buffer += data
            self.reads.append((self.base + len(self.buffer), at))
            # Each message has one "MSG " ("HMSG " too); a 3-byte tail counts one cut in two.
            window = tail + data
            self.seen += window.count(b"MSG ")
            if b"PING\r\n" in window:  # the server's keep-alive (payloads are JSON)
                await self.stream.send(b"PONG\r\n")
            tail = data[-3:]

    def messages(self) -> list[tuple[float, bytes]]:
        """(arrival, payload) of every message complete since the last call."""
        found: list[tuple[float, bytes]] = []
        buf, pos = self.buffer, 0
        while (eol := buf.find(b"\r\n", pos)) >= 0:
            line = bytes(buf[pos:eol])
            if not line.startswith((b"MSG ", b"HMSG ")):
                pos = eol + 2  # PING, PONG, +OK, INFO
                continue
            fields = line.split()
            headers = int(fields[-2]) if fields[0] == b"HMSG" else 0
            end = eol + 2 + int(fields[-1])
            if end + 2 > len(buf):
                break  # the rest has not arrived yet
            found.append((self._stamp(self.base + end), bytes(buf[eol + 2 + headers : end])))
            pos = end + 2
        del buf[:pos]
        self.base += pos
        return found

    def _stamp(self, offset: int) -> float:
        return self.reads[bisect.bisect_left(self.reads, (offset, float("-inf")))][1]


async def run(ctx: Context) -> Result:
    n, period, schedule = (1_000, 10, "*/10 * * * * *") if ctx.quick else (10_000, 60, "* * * * *")
    result = Result(
        "scheduler",
        f"4. Scheduler scale: {n:,} sources on '{schedule}', ticker only, {BOUNDARIES} boundaries",
    )
    startup = result.add(Measure("daemon start-up to ready", "s", digits=2))
    p50 = result.add(Measure("tick lateness p50", "ms", digits=1))
    p99 = result.add(Measure("tick lateness p99", "ms", target=("<", 100), digits=1))
    worst = result.add(Measure("tick lateness max (last command of the burst)", "ms", digits=1))
    handed = result.add(Measure("hand-over to the bus p99 (requested_at - slot)", "ms", digits=1))
    tick_cpu = result.add(Measure("ticker CPU per boundary", "s", digits=3))
    per_tick = result.add(Measure("ticker CPU per tick", "us", digits=0))
    idle = result.add(
        Measure("idle CPU between boundaries", "% of a core", target=("<", 2.0), digits=2)
    )
    missing = result.add(Measure("commands missing after the burst window", "", digits=0))

    async with namespace(ctx.services, "sch") as ns:
        sources = [
            {
                "name": f"s{i:05d}",
                "url": ctx.mock.url("/pages"),
                "schedule": schedule,
                "catchup": "none",
            }
            for i in range(n)
        ]
        config = daemon_settings(ns, sources)
        tap = await _Tap.open(ns.services.nats_url, f"{ns.prefix}.collect.>")
        async with tap.stream, anyio.create_task_group() as tg:
            tg.start_soon(tap.read_forever, name="bench-tap")
            spawned = time.monotonic()
            async with running_daemon(config, roles="ticker") as daemon:
                startup.values.append(time.monotonic() - spawned)
                now = time.time()
                boundary = (int(now) // period + 1) * period
                if boundary - now < PREPARED_S + 1.0:
                    boundary += period  # too close: the ticker may be preparing already
                idle_from: float | None = None
                idle_cpu = 0.0
                for _ in range(BOUNDARIES):
                    await _sleep_until(boundary - PREPARED_S)
                    if idle_from is not None:
                        cpu_now = daemon.cpu_seconds()
                        window = time.time() - idle_from
                        idle.values.append((cpu_now - idle_cpu) / window * 100)
                    tap.messages()  # forget anything before this boundary
                    seen = tap.seen
                    cpu_before = daemon.cpu_seconds()
                    # The burst: until every command arrived, or most of the period passed.
                    deadline = boundary + period * 0.9 - PREPARED_S
                    while tap.seen - seen < n and time.time() < deadline:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                    got = tap.messages()
                    await anyio.sleep(SETTLE_S)
                    cpu_after = daemon.cpu_seconds()
                    missing.values.append(n - len(got))
                    commands = [(at, _decode(data)) for at, data in got]
                    lateness = [
                        (at - command.scheduled_for.timestamp()) * 1000 for at, command in commands
                    ]
                    p50.values.append(percentile(lateness, 50))
                    p99.values.append(percentile(lateness, 99))
                    worst.values.append(max(lateness, default=float("nan")))
                    handed.values.append(
                        percentile(
                            [
                                (c.requested_at - c.scheduled_for).total_seconds() * 1000
                                for _, c in commands
                            ],
                            99,
                        )
                    )
                    tick_cpu.values.append(cpu_after - cpu_before)
                    per_tick.values.append((cpu_after - cpu_before) / max(1, len(got)) * 1e6)
                    idle_from, idle_cpu = time.time(), daemon.cpu_seconds()
                    boundary += period
            tg.cancel_scope.cancel()
    result.notes += [
        "one daemon, two consecutive boundaries: min-max are across the boundaries; idle CPU"
        f" is one window (from {SETTLE_S:g} s after the first burst to {PREPARED_S:g} s before"
        " the second).",
        "lateness = arrival on the bus (a bare NATS subscriber stamping each socket read)"
        " - the slot, wall clock. hand-over = the command's requested_at, stamped by the daemon"
        " when it gave the command to its NATS client.",
        f"CPU per boundary: from {PREPARED_S:g} s before it (the burst is prepared ahead) to"
        f" {SETTLE_S:g} s after its last command (spans ended, next slots planned).",
    ]
    return result


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await anyio.sleep(delay)
