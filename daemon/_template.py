"""Templating of a source's url, params and body with the run's window.

``{scheduled_for:%Y-%m-%d}``, ``{interval_start:…}`` and ``{interval_end:…}`` are timezone-aware
datetimes in the source's timezone, formatted with strftime specs; without a spec they render as
ISO 8601. ``{source}`` and ``{run_id}`` are strings. Attribute and index access are refused so a
template can only ever name these values. Literal braces are doubled: ``{{`` and ``}}``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

__all__ = ["FIELDS", "Window", "check_template", "render", "render_value"]

FIELDS = ("scheduled_for", "interval_start", "interval_end", "source", "run_id")


@dataclass(frozen=True, slots=True)
class Window:
    """What a run's templates may refer to."""

    source: str
    run_id: str
    scheduled_for: datetime
    interval_start: datetime
    tz: ZoneInfo

    def values(self) -> dict[str, object]:
        local_end = self.scheduled_for.astimezone(self.tz)
        return {
            "scheduled_for": local_end,
            "interval_start": self.interval_start.astimezone(self.tz),
            "interval_end": local_end,
            "source": self.source,
            "run_id": self.run_id,
        }


class _Formatter(string.Formatter):
    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if field_name not in FIELDS:
            raise ValueError(f"unknown placeholder {{{field_name}}}")
        return kwargs[field_name], field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, datetime) and not format_spec:
            return value.isoformat()
        return str(super().format_field(value, format_spec))


_formatter = _Formatter()


def check_template(template: str) -> None:
    """Raise ValueError naming the problem unless ``template`` can be rendered."""
    try:
        parsed = list(_formatter.parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from exc
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS:
            known = ", ".join(f"{{{f}}}" for f in FIELDS)
            raise ValueError(f"unknown placeholder {{{field}}} in {template!r} (known: {known})")
        if conversion:
            raise ValueError(f"conversions like !{conversion} are not supported in {template!r}")
        if spec and "{" in spec:
            raise ValueError(f"nested placeholders are not supported in {template!r}")


def render(template: str, window: Window) -> str:
    return _formatter.vformat(template, (), window.values())


def render_value(value: Any, window: Window) -> Any:
    """Render every string inside a JSON-like value (a POST body given as a TOML table)."""
    if isinstance(value, str):
        return render(value, window)
    if isinstance(value, dict):
        return {k: render_value(v, window) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, window) for v in value]
    return value


def check_value(value: Any) -> None:
    if isinstance(value, str):
        check_template(value)
    elif isinstance(value, dict):
        for v in value.values():
            check_value(v)
    elif isinstance(value, list):
        for v in value:
            check_value(v)
