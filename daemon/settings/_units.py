"""Named units and the checks every settings struct shares: durations, rates, field paths."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

__all__ = [
    "MIB",
    "MINUTES",
    "SECONDS",
    "PositiveFloat",
    "PositiveInt",
    "field_check",
    "format_duration",
    "parse_duration",
    "parse_rate",
]

SECONDS = 1.0
MINUTES = 60 * SECONDS
MIB = 1024 * 1024

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")


def parse_rate(text: str) -> float:
    """Seconds between requests for ``"5/s"``, ``"100/m"`` or ``"1000/h"``; ValueError otherwise."""
    match = _RATE_RE.match(text)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{text!r} is not a rate like '5/s', '100/m' or '1000/h'")
    return _UNIT_S[match[2]] / float(match[1])


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"`` or ``"2w"``; ValueError otherwise."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like '90s', '30m', '12h' or '7d'")
    return float(match[1]) * _UNIT_S[match[2]]


def format_duration(seconds: float) -> str:
    """``seconds`` for people, in at most two units: ``"45s"``, ``"2m1s"``, ``"1h10m"``,
    ``"26h"``, ``"7d14h"`` (hours up to two days); ``"never"`` for infinity. Display only:
    ``parse_duration`` reads one unit."""
    if seconds == float("inf"):
        return "never"
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        whole, part, units = total // 60, total % 60, "ms"
    elif total < 48 * 3600:
        whole, part, units = total // 3600, total % 3600 // 60, "hm"
    else:
        whole, part, units = total // 86400, total % 86400 // 3600, "dh"
    return f"{whole}{units[0]}" + (f"{part}{units[1]}" if part else "")


def field_check(name: str, check: Callable[[Any], object], value: Any) -> None:
    """``check(value)``, its ValueError naming ``name`` (msgspec adds the path above it)."""
    try:
        check(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
