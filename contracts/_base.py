"""The one base for every message on the bus.

Frozen and keyword-only so a message reads the same wherever it is built; unknown fields are
ignored on the wire so an older daemon can read a newer message (fields are only ever added,
with defaults). Encoders and decoders are built once, at import, per the msgspec perf notes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec

__all__ = ["UtcDatetime", "WireStruct", "decoder", "encode"]

#: Wall-clock instants on the wire are always timezone-aware.
UtcDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class WireStruct(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    """Base of every bus contract."""


T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(message: Any) -> bytes:
    """Encode a contract (or any msgspec-supported value) as JSON."""
    return _encoder.encode(message)


def decoder(type_: type[T]) -> msgspec.json.Decoder[T]:
    """Build a JSON decoder for one contract type; call once per type, at import."""
    return msgspec.json.Decoder(type_)
