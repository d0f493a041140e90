"""Bursts: thousands of messages to JetStream at one instant, each acked, none awaited alone.

The ticker hands over every command due at an instant at once (10,000 sources on one minute
schedule is 10,000 commands). nats-py's ``publish`` costs about 6 us a message here (checks,
a header block built per message, the command queued for its flusher task), and its flusher
writes only when the publisher yields, which also lets the client parse the acks that came
back meanwhile, delaying the commands still to go. A burst instead builds each message's
protocol frame itself (``HPUB <subject> <reply> <header bytes> <total bytes>``, the header
block, the payload) and writes the frames to the connection as they are built, a chunk at a
time, without yielding: the first commands are with the server while the last are built.

Every message still carries its own reply subject, so each is acked on its own and the
semantics are those of ``publish``: JetStream stores it once (``Nats-Msg-Id``), or refuses it
and that message alone is tried again. The acks come back on one long-lived subscription,
``<inbox>.<burst>.<index>``, subscribed once with a flush, so it is on the server before the
first frame of any burst (nats-py subscribes it again after a reconnect, before it says it is
connected). A frame written while the connection is failing is lost with it: its ack never
comes, and the message counts as refused after the wait, like one refused by JetStream.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from daemon.errors import BusUnavailable, TransientError, from_nats
from daemon.platform.bus._messages import Msg, PubAck

__all__ = ["BurstAcks", "Frame", "NoStream", "header_block"]

#: Frames written to the connection at a time.
_CHUNK = 256
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: What a subject may not contain: a space or a line end would break the protocol line.
_UNSAFE_SUBJECT = frozenset(" \t\r\n")

#: A message of a burst: subject, payload, and its headers (or their block, ``header_block``).
Frame = tuple[str, bytes, "dict[str, str] | bytes"]


def header_block(headers: dict[str, str]) -> bytes:
    """``NATS/1.0`` and each header, as nats-py's ``publish`` writes them (values trimmed,
    line ends made spaces); build it once for a message published later."""
    lines = ["NATS/1.0\r\n"]
    for key, value in headers.items():
        name = key.strip()
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"header name {name!r}: not a valid NATS header name")
        if name:
            lines.append(f"{name}: {value.strip().translate(_VALUE_NEWLINES)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


@dataclass(slots=True)
class _Burst:
    """One burst's acks as they come back."""

    replies: dict[int, Msg] = field(default_factory=dict)
    expected: int = -1
    done: anyio.Event = field(default_factory=anyio.Event)

    def add(self, index: int, msg: Msg) -> None:
        self.replies[index] = msg
        if len(self.replies) == self.expected:
            self.done.set()

    def sent(self, count: int) -> None:
        self.expected = count
        if len(self.replies) >= count:
            self.done.set()


class BurstAcks:
    """Publishes bursts on ``nc`` and collects their acks on one subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._subscribing = anyio.Lock()
        self._bursts: dict[str, _Burst] = {}
        self._numbers = itertools.count()

    async def publish(
        self, messages: Iterable[Frame], *, max_payload: int, timeout_s: float
    ) -> list[tuple[Frame, PubAck | TransientError]]:
        """Write every message, then wait up to ``timeout_s`` for their acks; per message,
        in order, the message and its ack or why it was refused. A message larger than
        ``max_payload`` raises ``PermanentError`` (``too_large``) before it is written."""
        await self._subscribe()
        number = str(next(self._numbers))
        burst = self._bursts[number] = _Burst()
        reply = f"{self._prefix}{number}.".encode()
        sent: list[Frame] = []
        subjects: list[str] = []
        refused: dict[int, TransientError] = {}
        try:
            frames: list[bytes] = []
            first = 0  # the index of frames[0]
            for index, message in enumerate(messages):
                subject, payload, headers = message
                sent.append(message)
                subjects.append(subject)
                block = headers if isinstance(headers, bytes) else header_block(headers)
                if len(block) + len(payload) > max_payload:
                    raise from_nats(nats.errors.MaxPayloadError(), f"publish to {subject}")
                if not frames:
                    first = index
                if not subject or not _UNSAFE_SUBJECT.isdisjoint(subject):
                    # A space or line end would break the protocol line: never written.
                    frames.append(b"")
                    refused[index] = BusUnavailable(f"publish to {subject!r}: bad subject")
                else:
                    size = len(block) + len(payload)
                    frames.append(
                        b"HPUB %b %b%d %d %d\r\n%b%b\r\n"
                        % (subject.encode(), reply, index, len(block), size, block, payload)
                    )
                if len(frames) >= _CHUNK:
                    self._write(frames, first, subjects, refused)
                    frames = []
            if frames:
                self._write(frames, first, subjects, refused)
            burst.sent(len(subjects) - len(refused))
            with anyio.move_on_after(timeout_s):
                await burst.done.wait()
        finally:
            del self._bursts[number]
        return [
            (message, refused.get(i) or _outcome(message[0], burst.replies.get(i), timeout_s))
            for i, message in enumerate(sent)
        ]

    def _write(
        self,
        frames: list[bytes],
        first: int,
        subjects: list[str],
        refused: dict[int, TransientError],
    ) -> None:
        """Hand ``frames`` (message ``first`` on) to the connection now; while it is down,
        each is refused."""
        transport = getattr(self._nc, "_transport", None)  # nats-py keeps it there
        if self._nc.is_connected and transport is not None:
            transport.writelines(frames)
            return
        for index in range(first, first + len(frames)):
            refused.setdefault(
                index, BusUnavailable(f"publish to {subjects[index]}: not connected to NATS")
            )

    async def _subscribe(self) -> None:
        """The acks' subscription, once; flushed, so the server has it before any frame."""
        async with self._subscribing:
            if self._sub is not None:
                return
            prefix = f"{self._nc.new_inbox()}."
            try:
                sub = await self._nc.subscribe(f"{prefix}>", cb=self._on_ack)
                await self._nc.flush(timeout=5)
            except (TimeoutError, nats.errors.Error) as exc:
                raise from_nats(exc, "receiving publish acks") from exc
            self._prefix, self._sub = prefix, sub

    async def _on_ack(self, msg: Msg) -> None:
        number, _, index = msg.subject[len(self._prefix) :].partition(".")
        burst = self._bursts.get(number)
        if burst is not None and index.isdigit():
            burst.add(int(index), msg)


_decode_ack = msgspec.json.Decoder(dict[str, object]).decode


def _outcome(subject: str, reply: Msg | None, timeout_s: float) -> PubAck | TransientError:
    """A message's ack, or why it is refused (to try again later)."""
    if reply is None:
        return BusUnavailable(f"publish to {subject}: no ack in {timeout_s} s")
    if reply.headers and reply.headers.get("Status") == "503":
        return NoStream(f"publish to {subject}: no stream")
    answer = _decode_ack(reply.data)
    if "error" in answer:
        return BusUnavailable(f"publish to {subject} refused: {answer['error']}")
    return PubAck.from_response(answer)


class NoStream(BusUnavailable):
    """No stream takes the subject (a server that lost its store): declare, send again."""
