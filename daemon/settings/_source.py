"""One source: the HTTP API to collect, on which schedule, and how (``[[sources]]``).

Every field is validated when the struct is built; an error names the field and the value, and
msgspec adds the path (``sources[1].schedule: invalid cron expression '61 * * * *'``). A
source's url, params and body are rendered with a sample window, and the URL must be one
coleta can request (http or https, a host, port 1-65535: ``template.parse_url``).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import httpx
import msgspec

from daemon.ids import run_id_for
from daemon.jsonpath import check_path, check_records_path
from daemon.schedule import Schedule, check_cron, check_timezone
from daemon.settings._auth import Auth
from daemon.settings._pagination import Pagination
from daemon.settings._units import (
    MIB,
    MINUTES,
    SECONDS,
    PositiveFloat,
    PositiveInt,
    field_check,
    format_duration,
    parse_duration,
    parse_rate,
)
from daemon.template import (
    Window,
    check_rendered,
    check_template,
    check_url,
    check_value,
    parse_url,
)

__all__ = [
    "FRESHNESS_MARGIN_MIN_S",
    "FRESHNESS_MARGIN_SHARE",
    "Incremental",
    "Retries",
    "SourceConfig",
    "default_freshness_s",
]

_NAME_RE = re.compile(r"^[a-z0-9_-]+$")

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]


class Retries(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Retry policy for transient failures (connection errors, timeouts, 429, 5xx)."""

    #: Attempts in all, the first included.
    max_attempts: PositiveInt = 3
    #: Cap of the exponential backoff (full jitter) between attempts.
    max_backoff_s: PositiveFloat = 5 * MINUTES


class Incremental(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ask only for what is new (``[sources.incremental]``): the largest ``field`` among the
    records of the last stored run is sent as the query parameter ``param``."""

    #: Path inside each record, e.g. ``updated_at`` or ``meta.id``.
    field: str
    #: Query parameter the cursor is sent as, e.g. ``since``.
    param: str
    #: Sent before any run has stored a record; unset: the first run sends no parameter.
    initial: str | None = None

    def __post_init__(self) -> None:
        field_check("field", check_path, self.field)


#: A source's default freshness window is its schedule's longest interval plus a margin: this
#: share of the interval, and never less than ``FRESHNESS_MARGIN_MIN_S`` (a daily schedule:
#: 24 h + 2 h; hourly: 1 h + 10 min).
FRESHNESS_MARGIN_SHARE = 1 / 12
FRESHNESS_MARGIN_MIN_S = 10 * MINUTES


def default_freshness_s(interval_s: float, jitter_s: float = 0.0) -> float:
    """How long a source may go without a stored run when ``freshness_s`` is unset: the
    schedule's longest interval, a margin for the run itself, and the source's jitter."""
    margin = max(FRESHNESS_MARGIN_MIN_S, interval_s * FRESHNESS_MARGIN_SHARE)
    return interval_s + margin + jitter_s


def _check_origins(origins: list[str]) -> None:
    for origin in origins:
        try:
            url = parse_url(origin)
        except httpx.InvalidURL as exc:
            raise ValueError(f"{origin!r} is not an origin: {exc}") from None
        if url.userinfo or url.path not in ("", "/") or url.query or url.fragment:
            raise ValueError(
                f"{origin!r} must be scheme://host[:port], with no path, query or user"
            )


class SourceConfig(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, weakref=True
):
    """One HTTP API to collect on a schedule.

    Weakly referable: the secrets its values were resolved from are kept beside it
    (``secrets_of``) for as long as it lives.
    """

    name: str
    url: str
    schedule: str
    timezone: str = "UTC"
    method: Method = "GET"
    headers: dict[str, str] = {}
    params: dict[str, str] = {}
    #: Request body for POST/PUT/PATCH: a TOML table is sent as JSON, a string as is.
    body: str | dict[str, Any] | None = None
    #: Per request: the longest wait for the server to send (read) or accept (write) data.
    timeout_s: PositiveFloat = 30 * SECONDS
    #: Per request: the longest wait to open the connection (TCP + TLS).
    connect_timeout_s: PositiveFloat = 10 * SECONDS
    #: One attempt of the run, every page included; past it the attempt counts as a timeout.
    total_timeout_s: PositiveFloat = 5 * MINUTES
    enabled: bool = True
    retries: Retries = msgspec.field(default_factory=Retries)
    #: A larger response fails the run with ``response_too_large``; nothing is stored.
    max_response_bytes: PositiveInt = 64 * MIB
    #: Runs missed while the daemon was down: none, the latest one, or all (oldest first).
    catchup: Literal["none", "latest", "all"] = "latest"
    #: How far back catch-up looks, as a duration: ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``.
    catchup_window: str = "7d"
    #: Let a new run of this source start while another is still being fetched.
    allow_overlap: bool = False
    #: Keep this many days of collected rows and runs; older ones are pruned. Unset: keep all.
    retention_days: PositiveInt | None = None
    #: How to follow the API's pages (``[sources.pagination]``); unset: one request per run.
    pagination: Pagination | None = None
    #: Where a page's records are (``data.items``; ``"$"``, or unset: the body itself when it is
    #: a list).
    records_path: str | None = None
    #: ``page``: one row per response page; ``record``: one row per record of a page.
    granularity: Literal["page", "record"] = "page"
    #: Send ``If-None-Match`` / ``If-Modified-Since`` from the last stored response; a 304
    #: makes the run ``unchanged``. Single-request sources only (no pagination).
    conditional: bool = True
    #: A body identical (sha256) to the last stored one is not stored again: run ``unchanged``.
    skip_unchanged: bool = False
    #: Ask only for records newer than the last run's (``[sources.incremental]``).
    incremental: Incremental | None = None
    #: Credentials for every request (``[sources.auth]``, ``kind = "bearer"`` …).
    auth: Auth | None = None
    #: Origins (``scheme://host[:port]``) besides the URL's own that the credentials (auth,
    #: secret headers and parameters) may go to: a CDN host the API's pages or redirects use.
    auth_origins: list[str] = []
    #: Requests per host at most, shared by every source of that host: ``"5/s"``, ``"100/m"``.
    rate_limit: str | None = None
    #: Fire each slot up to this many seconds late, by a fixed offset derived from the name.
    jitter_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: A stored run is expected at least this often; past it the source is late and the
    #: daemon degraded. Unset: from the schedule (``default_freshness_s``).
    freshness_s: PositiveFloat | None = None
    #: Failed runs in a row that make the daemon degraded; unset: the top-level key's.
    failures_before_degraded: PositiveInt | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"name: {self.name!r} must match [a-z0-9_-]+")
        field_check("schedule", check_cron, self.schedule)
        field_check("timezone", check_timezone, self.timezone)
        field_check("url", check_template, self.url)
        if not re.match(r"^https?://", self.url):
            raise ValueError(f"url: {self.url!r} must start with http:// or https://")
        window = _sample_window(self.name, self.timezone)
        field_check("url", lambda url: check_url(url, window), self.url)
        for key, value in self.params.items():
            field_check(f"params.{key}", check_template, value)
            field_check(f"params.{key}", lambda value: check_rendered(value, window), value)
        field_check("catchup_window", parse_duration, self.catchup_window)
        if self.body is not None:
            if self.method in ("GET", "HEAD", "DELETE"):
                raise ValueError(f"body: a body needs method POST, PUT or PATCH, not {self.method}")
            field_check("body", check_value, self.body)
            field_check("body", lambda body: check_rendered(body, window), self.body)
        if self.records_path is not None:
            field_check("records_path", check_records_path, self.records_path)
        p = self.pagination
        if (
            p is not None
            and p.kind == "offset"
            and not (self.records_path or p.records_path or p.has_more_path or p.total_path)
        ):
            raise ValueError(
                "pagination.records_path: offset pagination needs to know where a page's records"
                " are (a page shorter than limit is the last), or has_more_path / total_path to"
                ' stop on; use records_path = "$" when the body itself is the list'
            )
        if (
            self.incremental is not None
            and self.records_path is None
            and (self.granularity != "record")
        ):
            raise ValueError(
                "incremental: needs records_path (where the records whose field is tracked"
                " are), or granularity = 'record' for a list or JSON-lines body"
            )
        if self.skip_unchanged and self.pagination is not None:
            raise ValueError("skip_unchanged: not supported with pagination (one body per run)")
        if self.rate_limit is not None:
            field_check("rate_limit", parse_rate, self.rate_limit)
        if self.jitter_s:
            field_check("jitter_s", _check_jitter(self.cron), self.jitter_s)
        field_check("auth_origins", _check_origins, self.auth_origins)
        if self.freshness_s is not None:
            field_check("freshness_s", _check_freshness(self.cron), self.freshness_s)

    @property
    def cron(self) -> Schedule:
        return Schedule.parse(self.schedule, self.timezone)

    @property
    def catchup_window_s(self) -> float:
        return parse_duration(self.catchup_window)

    @property
    def freshness_window_s(self) -> float:
        """How long this source may go without a stored run before it is late: ``freshness_s``,
        or the default from its schedule."""
        if self.freshness_s is not None:
            return self.freshness_s
        return default_freshness_s(self.cron.longest_interval_s(), self.jitter_s)

    @property
    def rate_interval_s(self) -> float:
        """Least time between two requests to this source's host (0: no limit)."""
        return parse_rate(self.rate_limit) if self.rate_limit is not None else 0.0


#: The slot a source's templates are rendered for when the config is checked: any will do, as
#: every run renders values of the same types (a run checks its own URL again).
_SAMPLE_SLOT = datetime(2026, 1, 1, tzinfo=UTC)


def _sample_window(name: str, timezone: str) -> Window:
    return Window(
        source=name,
        run_id=run_id_for(name, _SAMPLE_SLOT),
        scheduled_for=_SAMPLE_SLOT,
        interval_start=_SAMPLE_SLOT - timedelta(days=1),
        tz=ZoneInfo(timezone),
    )


def _check_jitter(cron: Schedule) -> Any:
    def check(jitter_s: float) -> None:
        # The shortest gap among the next slots: a jitter past it would fire slots out of turn.
        slot = cron.next_after(datetime(2026, 1, 1, tzinfo=UTC))
        gap = float("inf")
        for _ in range(64):
            nxt = cron.next_after(slot)
            gap = min(gap, (nxt - slot).total_seconds())
            slot = nxt
        if jitter_s >= gap:
            raise ValueError(
                f"{jitter_s:g} must be less than the schedule's shortest interval ({gap:g} s)"
            )

    return check


def _check_freshness(cron: Schedule) -> Any:
    def check(freshness_s: float) -> None:
        interval = cron.longest_interval_s()
        if math.isfinite(interval) and freshness_s <= interval:
            raise ValueError(
                f"{freshness_s:g} must be longer than the schedule's longest interval"
                f" ({format_duration(interval)}), or the source is late before each of its runs"
            )

    return check
