"""Templating of a source's url, params and body with the run's window.

``{scheduled_for:%Y-%m-%d}``, ``{interval_start:…}`` and ``{interval_end:…}`` are timezone-aware
datetimes in the source's timezone, formatted with strftime specs; without a spec they render as
ISO 8601. ``{source}`` and ``{run_id}`` are strings. Attribute and index access are refused so a
template can only ever name these values. Literal braces are doubled: ``{{`` and ``}}``.

What a URL template renders to must be a URL coleta can request (``parse_url``): checked with a
sample window when the config is loaded (``check_url``), and again for every run and page.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx

__all__ = [
    "FIELDS",
    "Window",
    "check_rendered",
    "check_template",
    "check_url",
    "parse_url",
    "render",
    "render_value",
]

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


def check_rendered(value: Any, window: Window) -> None:
    """Raise ValueError naming the template unless every one in ``value`` (a template, or a
    JSON-like value holding templates) renders with ``window``: a format spec its field cannot
    take (``{source:%Y}``) fails here, not in ``check_template``."""
    if isinstance(value, str):
        try:
            render(value, window)
        except ValueError as exc:
            raise ValueError(f"cannot render {value!r}: {exc}") from None
    elif isinstance(value, dict):
        for v in value.values():
            check_rendered(v, window)
    elif isinstance(value, list):
        for v in value:
            check_rendered(v, window)


def check_url(template: str, window: Window | None = None) -> None:
    """Raise ValueError unless ``template`` rendered with ``window`` (as is, without one) is a
    URL coleta can request (``parse_url``); the message shows the value and what it rendered to."""
    rendered = template
    if window is not None:
        check_rendered(template, window)
        rendered = render(template, window)
    try:
        parse_url(rendered)
    except httpx.InvalidURL as exc:
        shown = repr(template) if rendered == template else f"{template!r} (as {rendered!r})"
        raise ValueError(f"{shown} is not a URL coleta can request: {exc}") from None


#: A host name: dot-separated labels of letters, digits, ``-`` and ``_``, 1-63 characters each.
_HOST_RE = re.compile(r"^(?!.{254})[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*\.?$")


def parse_url(url: str | httpx.URL, *, base: httpx.URL | None = None) -> httpx.URL:
    """``url`` (relative to ``base``, if given) as httpx parses it, if it is one coleta can send
    a request to; else ``httpx.InvalidURL`` saying what is wrong (never a ``UnicodeError``).

    httpx accepts more than any server can be asked for: an empty host, port 0 or 99999, a
    space or other garbage in the host (percent-encoded), an over-long DNS label; and it raises
    ``UnicodeError`` for a bad IDNA label or a lone surrogate.
    """
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        if base is not None:
            parsed = base.join(parsed)
        parsed.host  # noqa: B018 -- decodes an IDNA host: UnicodeError for a bad A-label
    except UnicodeError as exc:
        raise httpx.InvalidURL(f"cannot be encoded ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise httpx.InvalidURL(f"the scheme {parsed.scheme!r} is not http or https")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise httpx.InvalidURL("there is no host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise httpx.InvalidURL(f"the host {host!r} is not an IPv6 address") from None
    elif not _HOST_RE.match(host):
        raise httpx.InvalidURL(f"the host {host!r} is not a valid host name or IP address")
    port = parsed.port
    if port is not None and not 1 <= port <= 65535:
        raise httpx.InvalidURL(f"port {port} is not in 1-65535")
    return parsed
