"""Configuration: a TOML file decoded and validated with msgspec, plus environment overrides.

Unknown keys are errors here (a typo in a config file must not pass silently), unlike on the
wire. Every error names the key path and the bad value, e.g.
``sources[1].schedule: invalid cron expression '61 * * * *'``.

Environment: ``NATS_URL``, ``DATABASE_URL``, ``LOG_LEVEL``, ``COLETA_STATE_DIR``,
``COLETA_BUS_PREFIX`` and ``COLETA_DATABASE_SCHEMA`` override the file. With no config
file, ``EXTERNAL_API_URL`` (+ ``EXTERNAL_API_KEY`` sent as a Bearer token, ``SCHEDULE_HOUR``)
defines one source named ``external_api`` that runs daily at that hour (the original setup).

Secrets: a header or query parameter value may be a table ``{ secret = "api_token" }``
(optionally with ``prefix = "Bearer "``), resolved when the config is loaded from the file
``$CREDENTIALS_DIRECTORY/api_token`` (systemd ``LoadCredential=``), else from the environment
variable ``COLETA_SECRET_API_TOKEN``. A missing secret is a ConfigError naming the key; a
secret's value is never logged.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from contracts import DEFAULT_PREFIX
from daemon._pagination import Pagination
from daemon._schedule import Schedule, check_cron, check_timezone
from daemon._template import check_template, check_value
from daemon.errors import ConfigError

__all__ = [
    "SECONDS",
    "Incremental",
    "Retries",
    "Settings",
    "SourceConfig",
    "load_settings",
    "parse_duration",
    "parse_rate",
    "parse_settings",
    "resolve_secrets",
]

SECONDS = 1.0
MINUTES = 60 * SECONDS
MIB = 1024 * 1024

_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


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
        _field("field", _check_path, self.field)


_JSON_PATH_RE = re.compile(r"^(?:[^.\[\]]+|\[\d+\])(?:\.[^.\[\]]+|\[\d+\])*$")


def _check_path(path: str) -> None:
    if not _JSON_PATH_RE.match(path):
        raise ValueError(f"{path!r} is not a path like 'data.items' or 'a[0].b'")


class _AuthBase(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    """``[sources.auth]``: credentials applied to every request of the source.

    Secret fields (token, key, password, client_secret) come only from ``{ secret = "…" }``
    references, resolved at load; ``repr`` never shows them.
    """

    _SECRETS: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={'<secret>' if name in self._SECRETS else getattr(self, name)!r}"
            for name in self.__struct_fields__
        )
        return f"{type(self).__name__}({shown})"


class BearerAuth(_AuthBase, frozen=True, tag="bearer"):
    """``Authorization: Bearer <token>``."""

    _SECRETS = ("token",)
    token: str


class ApiKeyAuth(_AuthBase, frozen=True, tag="api_key"):
    """A key in a request header (``header = "X-Api-Key"``) or query parameter (``param``)."""

    _SECRETS = ("key",)
    key: str
    header: str | None = None
    param: str | None = None

    def __post_init__(self) -> None:
        if (self.header is None) == (self.param is None):
            raise ValueError("header: give exactly one of header or param for an api_key")


class BasicAuth(_AuthBase, frozen=True, tag="basic"):
    """HTTP Basic authentication."""

    _SECRETS = ("password",)
    username: str
    password: str


class OAuth2Auth(_AuthBase, frozen=True, tag="oauth2"):
    """OAuth 2 client credentials: a token from ``token_url``, cached, refreshed before expiry."""

    _SECRETS = ("client_secret",)
    token_url: str
    client_id: str
    client_secret: str
    scope: str | None = None
    audience: str | None = None
    #: How the client authenticates to the token endpoint: HTTP Basic (RFC 6749) or form fields.
    client_auth: Literal["basic", "body"] = "basic"
    #: Fetch a new token this long before the old one expires (at most half its lifetime).
    refresh_margin_s: Annotated[float, msgspec.Meta(ge=0)] = 60 * SECONDS

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.token_url):
            raise ValueError(f"token_url: {self.token_url!r} must start with http:// or https://")


Auth = BearerAuth | ApiKeyAuth | BasicAuth | OAuth2Auth
#: Fields of ``[sources.auth]`` that must be ``{ secret = "…" }`` references, never literals.
AUTH_SECRET_FIELDS = ("token", "key", "password", "client_secret")


class SourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One HTTP API to collect on a schedule."""

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
    #: Where a page's records are (``data.items``); unset: the body itself when it is a list.
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
    #: Requests per host at most, shared by every source of that host: ``"5/s"``, ``"100/m"``.
    rate_limit: str | None = None
    #: Fire each slot up to this many seconds late, by a fixed offset derived from the name.
    jitter_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"name: {self.name!r} must match [a-z0-9_-]+")
        _field("schedule", check_cron, self.schedule)
        _field("timezone", check_timezone, self.timezone)
        _field("url", check_template, self.url)
        if not re.match(r"^https?://", self.url):
            raise ValueError(f"url: {self.url!r} must start with http:// or https://")
        for key, value in self.params.items():
            _field(f"params.{key}", check_template, value)
        _field("catchup_window", parse_duration, self.catchup_window)
        if self.body is not None:
            if self.method in ("GET", "HEAD", "DELETE"):
                raise ValueError(f"body: a body needs method POST, PUT or PATCH, not {self.method}")
            _field("body", check_value, self.body)
        if self.records_path is not None:
            _field("records_path", _check_path, self.records_path)
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
            _field("rate_limit", parse_rate, self.rate_limit)
        if self.jitter_s:
            _field("jitter_s", _check_jitter(self.cron), self.jitter_s)

    @property
    def cron(self) -> Schedule:
        return Schedule.parse(self.schedule, self.timezone)

    @property
    def catchup_window_s(self) -> float:
        return parse_duration(self.catchup_window)

    @property
    def rate_interval_s(self) -> float:
        """Least time between two requests to this source's host (0: no limit)."""
        return parse_rate(self.rate_limit) if self.rate_limit is not None else 0.0


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")


def parse_rate(text: str) -> float:
    """Seconds between requests for ``"5/s"``, ``"100/m"`` or ``"1000/h"``; ValueError otherwise."""
    match = _RATE_RE.match(text)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{text!r} is not a rate like '5/s', '100/m' or '1000/h'")
    return _UNIT_S[match[2]] / float(match[1])


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


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"`` or ``"2w"``; ValueError otherwise."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like '90s', '30m', '12h' or '7d'")
    return float(match[1]) * _UNIT_S[match[2]]


def _field(name: str, check: Any, value: Any) -> None:
    try:
        check(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the daemon needs; built once, validated when built."""

    sources: list[SourceConfig] = []
    #: ``nats://…``; unset → an embedded nats-server under ``state_dir``.
    nats_url: str | None = None
    #: libpq URL; unset → an embedded PostgreSQL under ``state_dir``.
    database_url: str | None = None
    state_dir: str = ".coleta"
    log_level: str = "INFO"
    #: Prefix of every subject and stream, so deployments can share a NATS server.
    bus_prefix: str = DEFAULT_PREFIX
    #: PostgreSQL schema holding coleta's tables.
    database_schema: str = "public"
    max_concurrent_fetches: PositiveInt = 8
    #: How long a SIGTERM waits for in-flight work before handing it back.
    shutdown_grace_s: PositiveFloat = 10 * SECONDS
    writer_batch_size: PositiveInt = 256
    #: How long a message may stay unacknowledged before JetStream redelivers it (a crashed
    #: daemon's runs are redone after this). Long runs send progress so they are not redelivered.
    ack_wait_s: PositiveFloat = 30 * SECONDS
    #: How long JetStream keeps commands and payloads (and de-duplicates run ids).
    stream_max_age_s: PositiveFloat = 7 * 24 * 60 * MINUTES
    duplicate_window_s: PositiveFloat = 60 * MINUTES
    #: Copies JetStream keeps of each stream (1, or 3/5 on a NATS cluster).
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    #: Where JetStream keeps the streams: ``file`` (survives restarts) or ``memory``.
    stream_storage: Literal["file", "memory"] = "file"

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            if source.name in seen:
                raise ValueError(
                    f"sources[{i}].name: duplicate source name {source.name!r}"
                    f" (first defined at sources[{seen[source.name]}])"
                )
            seen[source.name] = i
        if self.log_level.upper() not in _LEVELS:
            raise ValueError(f"log_level: {self.log_level!r} is not one of {', '.join(_LEVELS)}")
        if not re.match(r"^[a-z][a-z0-9_]*$", self.bus_prefix):
            raise ValueError(f"bus_prefix: {self.bus_prefix!r} must match [a-z][a-z0-9_]*")
        if not re.match(r"^[a-z_][a-z0-9_]*$", self.database_schema):
            raise ValueError(
                f"database_schema: {self.database_schema!r} must match [a-z_][a-z0-9_]*"
            )
        if self.duplicate_window_s > self.stream_max_age_s:
            raise ValueError(
                f"duplicate_window_s: {self.duplicate_window_s} must not exceed"
                f" stream_max_age_s ({self.stream_max_age_s})"
            )

    def source(self, name: str) -> SourceConfig | None:
        for source in self.sources:
            if source.name == name:
                return source
        return None


_PATH_RE = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)


_MISSING = object()


def _lookup(data: Any, path: str) -> Any:
    """The value at a msgspec error path like ``sources[0].timeout_s``, if present."""
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        try:
            data = data[int(index)] if index else data[name]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


def _explain(exc: msgspec.ValidationError, origin: str, data: Any) -> ConfigError:
    """Turn msgspec's ``msg - at `$.a[0]` `` into ``origin: a[0].field: msg (got value)``."""
    text = str(exc)
    match = _PATH_RE.match(text)
    if match is None:
        top_unknown = re.match(r"^Object contains unknown field `(?P<key>[^`]+)`$", text)
        if top_unknown:
            return ConfigError(f"{origin}: {top_unknown['key']}: unknown key")
        return ConfigError(f"{origin}: {text}")
    path, msg = match["path"].lstrip("."), match["msg"]
    unknown = re.match(r"Object contains unknown field `(?P<key>[^`]+)`", msg)
    if unknown:
        key = f"{path}.{unknown['key']}" if path else unknown["key"]
        return ConfigError(f"{origin}: {key}: unknown key")
    inner = re.match(r"^(?P<field>[a-z_][a-z0-9_.]*): (?P<rest>.*)$", msg, re.S)
    if inner and not msg.startswith(("Expected", "Object")):
        field = f"{path}.{inner['field']}" if path else inner["field"]
        return ConfigError(f"{origin}: {field}: {inner['rest']}")
    value = _lookup(data, path)
    got = "" if value is _MISSING or msg.startswith("Object missing") else f" (got {value!r})"
    if got and re.search(r"(^|\s)" + re.escape(repr(value)) + "$", msg):
        got = ""  # msgspec already named the value
    return ConfigError(f"{origin}: {path or '(top level)'}: {msg}{got}")


def parse_settings(data: Mapping[str, Any], origin: str = "config") -> Settings:
    """Validate a decoded config mapping."""
    try:
        return msgspec.convert(dict(data), Settings)
    except msgspec.ValidationError as exc:
        raise _explain(exc, origin, data) from None


def _legacy_source(env: Mapping[str, str]) -> dict[str, Any] | None:
    url = env.get("EXTERNAL_API_URL")
    if not url:
        return None
    hour_text = env.get("SCHEDULE_HOUR", "0")
    try:
        hour = int(hour_text)
    except ValueError:
        hour = -1
    if not 0 <= hour <= 23:
        raise ConfigError(f"SCHEDULE_HOUR: {hour_text!r} must be an hour from 0 to 23")
    source: dict[str, Any] = {"name": "external_api", "url": url, "schedule": f"0 {hour} * * *"}
    if key := env.get("EXTERNAL_API_KEY"):
        source["headers"] = {"Authorization": f"Bearer {key}"}
    return source


_SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _secret(key: str, ref: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """The value of ``{ secret = "name", prefix = "…" }`` at ``key``; ConfigError if missing."""
    unknown = sorted(set(ref) - {"secret", "prefix"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (a secret takes secret and prefix)")
    name, prefix = ref.get("secret"), ref.get("prefix", "")
    if not isinstance(name, str) or not _SECRET_NAME_RE.match(name):
        raise ConfigError(f"{key}.secret: {name!r} must be a name matching [A-Za-z0-9_.-]+")
    if not isinstance(prefix, str):
        raise ConfigError(f"{key}.prefix: must be a string (got {prefix!r})")
    var = "COLETA_SECRET_" + re.sub(r"[^A-Z0-9]", "_", name.upper())
    if directory := env.get("CREDENTIALS_DIRECTORY"):
        try:
            return prefix + (Path(directory) / name).read_text().rstrip("\r\n")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"{key}: secret {name!r}: cannot read: {exc.strerror}") from None
    if (value := env.get(var)) is not None:
        return prefix + value
    raise ConfigError(
        f"{key}: secret {name!r} not found (no file $CREDENTIALS_DIRECTORY/{name},"
        f" no variable {var})"
    )


def resolve_secrets(data: dict[str, Any], origin: str, env: Mapping[str, str]) -> None:
    """Replace every ``{ secret = … }`` header or parameter value in place."""
    sources = data.get("sources")
    if not isinstance(sources, list):
        return
    for i, source in enumerate(sources):
        if not isinstance(source, dict):
            continue
        for table in ("headers", "params"):
            values = source.get(table)
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                if isinstance(value, dict):
                    resolved = _secret(f"{origin}: sources[{i}].{table}.{name}", value, env)
                    # Parameters are templates: a brace in a secret must stay a brace.
                    if table == "params":
                        resolved = resolved.replace("{", "{{").replace("}", "}}")
                    values[name] = resolved
        if isinstance(auth := source.get("auth"), dict):
            _resolve_auth(auth, f"{origin}: sources[{i}].auth", env)


def _resolve_auth(auth: dict[str, Any], key: str, env: Mapping[str, str]) -> None:
    """Secret fields must be references; any field may be one (``client_id`` too)."""
    for name, value in auth.items():
        if isinstance(value, dict):
            auth[name] = _secret(f"{key}.{name}", value, env)
        elif name in AUTH_SECRET_FIELDS:
            # Never echo the value: it is a secret written where it does not belong.
            raise ConfigError(
                f"{key}.{name}: an inline secret is not allowed; write"
                f' {name} = {{ secret = "<name>" }} and put the value in'
                " $CREDENTIALS_DIRECTORY/<name> or COLETA_SECRET_<NAME>"
            )


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    secret_env: Mapping[str, str] | None = None,
) -> Settings:
    """Read ``path`` (or ``$COLETA_CONFIG``), resolve secrets, apply the environment, validate.

    Secrets come from ``secret_env`` (default: ``env``).
    """
    env = os.environ if env is None else env
    path = path or env.get("COLETA_CONFIG") or None
    data: dict[str, Any] = {}
    origin = "environment"
    if path is not None:
        origin = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{origin}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read: {exc.strerror}") from None
    else:
        legacy = _legacy_source(env)
        if legacy is None:
            raise ConfigError(
                "no configuration: pass --config FILE, set COLETA_CONFIG, "
                "or set EXTERNAL_API_URL (with SCHEDULE_HOUR) for a single daily source"
            )
        data["sources"] = [legacy]
    for var, key in (
        ("NATS_URL", "nats_url"),
        ("DATABASE_URL", "database_url"),
        ("LOG_LEVEL", "log_level"),
        ("COLETA_STATE_DIR", "state_dir"),
        ("COLETA_BUS_PREFIX", "bus_prefix"),
        ("COLETA_DATABASE_SCHEMA", "database_schema"),
    ):
        if value := env.get(var):
            data[key] = value
    resolve_secrets(data, origin, env if secret_env is None else secret_env)
    return parse_settings(data, origin)
