"""What a request may hold, and how a reply stays within one NATS message, whatever it held.

A request is decoded with its contract (``decode``: lenient about what it accepts, a bare
source name is a trigger request); what it cannot be is a ``ServiceFailure`` ``bad_request``
naming why, never an echo of the request. A reply over the server's ``max_payload`` is refused
by the client, and one whose headers push it over is refused by the server, which drops the
connection: so a list is sent a page at a time (``Page``), a value from a request is repeated
only in part (``echo``), and an error message is one short printable line (``one_line``), fit
for the ``Nats-Service-Error`` header.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import msgspec

from contracts import TriggerRequest, encode
from daemon.errors import ServiceFailure

__all__ = [
    "ECHO_CHARS",
    "MESSAGE_CHARS",
    "Page",
    "decode",
    "echo",
    "one_line",
    "parse_trigger",
    "sql_text",
]

T = TypeVar("T")

#: Most characters of a request's value an error message repeats.
ECHO_CHARS = 80
#: Longest error message.
MESSAGE_CHARS = 300


class Page(Generic[T]):
    """Items whose JSON fits in ``room`` bytes, in order; the first is always taken, so a
    page never comes back empty while items remain (each item is bounded by its fields)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.items: list[T] = []

    def extend(self, items: Sequence[T]) -> bool:
        """Take items while they fit; False once one did not (the page is full)."""
        for item in items:
            size = len(encode(item)) + (1 if self.items else 0)  # and a comma
            if self.items and size > self.room:
                return False
            self.items.append(item)
            self.room -= size
        return True


def echo(value: str) -> str:
    """A request's value in a message: repr-escaped, and at most ``ECHO_CHARS`` of it."""
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}… ({len(value):,} characters)"


def one_line(message: str) -> str:
    """``message`` as one printable line of at most ``MESSAGE_CHARS`` characters."""
    text = "".join(c if c.isprintable() else " " for c in message)
    if len(text) > MESSAGE_CHARS:
        text = text[: MESSAGE_CHARS - 1] + "…"
    return text


def decode(data: bytes, type_: type[T], *, empty: T) -> T:
    if not data.strip():
        return empty
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise ServiceFailure("bad_request", f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ServiceFailure("bad_request", f"malformed JSON: {exc}") from None
    except RecursionError:  # msgspec's answer to deep nesting, even in an ignored field
        raise ServiceFailure("bad_request", "malformed request: JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ServiceFailure("bad_request", "malformed request: a string is not UTF-8") from None


def parse_trigger(data: bytes) -> TriggerRequest:
    """A JSON object, a JSON string, or a bare source name."""
    text = data.strip()
    if not text:
        raise ServiceFailure("bad_request", 'empty request: send {"source": "<name>"}')
    if text[:1] not in (b"{", b'"', b"["):
        name = text.decode("utf-8", "replace")
        if set(name) <= _NAME_CHARS:
            return TriggerRequest(source=name)
        raise ServiceFailure(
            "bad_request", f'malformed request {echo(name)}: send {{"source": "<name>"}}'
        )
    if text[:1] == b'"':
        return TriggerRequest(source=decode(text, str, empty=""))
    return decode(text, TriggerRequest, empty=TriggerRequest(source=""))


def sql_text(name: str, value: str | None) -> str | None:
    """``value``, if PostgreSQL can take it as text (no NUL, no lone surrogate)."""
    if value is None:
        return None
    if "\x00" in value:
        raise ServiceFailure("bad_request", f"{name}: {echo(value)} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ServiceFailure("bad_request", f"{name}: {echo(value)} is not valid text") from None
    return value


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
