"""Loading the configuration: a TOML file decoded and validated with msgspec, plus the
environment.

Every error names the key path and the bad value, e.g. ``sources[1].schedule: invalid cron
expression '61 * * * *'``. Environment: ``NATS_URL`` and natscli's ``NATS_USER``,
``NATS_PASSWORD``, ``NATS_CREDS``, ``NATS_NKEY``, ``NATS_CA``, ``NATS_CERT``, ``NATS_KEY``
(``platform.nats_auth``), ``DATABASE_URL``, ``LOG_LEVEL``, ``COLETA_STATE_DIR``,
``COLETA_BUS_PREFIX``, ``COLETA_DATABASE_SCHEMA`` and ``COLETA_WORKERS`` override the file.
With no config file, ``EXTERNAL_API_URL`` (+ ``EXTERNAL_API_KEY`` sent as a Bearer token,
``SCHEDULE_HOUR``) defines one source named ``external_api`` that runs daily at that hour (the
original setup). A NATS password is a secret too: ``nats_password = { secret = "nats" }``, or
``NATS_PASSWORD``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from daemon.errors import ConfigError
from daemon.jsonpath import path_tokens
from daemon.platform.redact import Secret
from daemon.settings._auth import SecretValue
from daemon.settings._secrets import keep_resolved, resolve_secret, resolve_secrets
from daemon.settings._settings import Settings

__all__ = ["NATS_ENV", "apply_nats_env", "load_settings", "parse_settings", "read_toml"]


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's contents; ConfigError when it is missing, unreadable or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


_PATH_RE = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_MISSING = object()


def _lookup(data: Any, path: str) -> Any:
    """The value at a msgspec error path like ``sources[0].timeout_s``, if present."""
    for name, index in path_tokens(path):
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
        source["headers"] = {"Authorization": SecretValue(f"Bearer {key}")}
    return source


def _legacy_secrets(env: Mapping[str, str]) -> list[tuple[int, Secret]]:
    if key := env.get("EXTERNAL_API_KEY"):
        return [(0, Secret("EXTERNAL_API_KEY", key, header="Authorization"))]
    return []


#: natscli's variables, and the keys they override (the variable wins over the file).
NATS_ENV = {
    "NATS_URL": "nats_url",
    "NATS_USER": "nats_user",
    "NATS_PASSWORD": "nats_password",
    "NATS_CREDS": "nats_creds",
    "NATS_NKEY": "nats_nkey",
    "NATS_CA": "nats_ca",
    "NATS_CERT": "nats_cert",
    "NATS_KEY": "nats_key",
}


def apply_nats_env(
    data: dict[str, Any], origin: str, env: Mapping[str, str], secret_env: Mapping[str, str]
) -> None:
    """In place: natscli's variables over the file's NATS keys, and the file's
    ``nats_password`` resolved from its ``{ secret = … }`` reference (an inline password is
    an error: it is a secret written where it does not belong)."""
    for var, key in NATS_ENV.items():
        if value := env.get(var):
            data[key] = value
        elif key == "nats_password" and key in data:
            if not isinstance(data[key], dict):
                raise ConfigError(
                    f"{origin}: nats_password: an inline secret is not allowed; write"
                    ' nats_password = { secret = "<name>" } and put the value in'
                    " $CREDENTIALS_DIRECTORY/<name> or COLETA_SECRET_<NAME>, or set NATS_PASSWORD"
                )
            prefix, secret = resolve_secret(f"{origin}: nats_password", data[key], secret_env)
            data[key] = prefix + secret


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
        data = read_toml(path)
    else:
        legacy = _legacy_source(env)
        if legacy is None:
            raise ConfigError(
                "no configuration: pass --config FILE, set COLETA_CONFIG, "
                "or set EXTERNAL_API_URL (with SCHEDULE_HOUR) for a single daily source"
            )
        data["sources"] = [legacy]
    apply_nats_env(data, origin, env, env if secret_env is None else secret_env)
    for var, key in (
        ("DATABASE_URL", "database_url"),
        ("LOG_LEVEL", "log_level"),
        ("COLETA_STATE_DIR", "state_dir"),
        ("COLETA_BUS_PREFIX", "bus_prefix"),
        ("COLETA_DATABASE_SCHEMA", "database_schema"),
        ("COLETA_WORKERS", "workers"),
    ):
        if value := env.get(var):
            data[key] = int(value) if key == "workers" and value.strip().isdigit() else value
    resolved = resolve_secrets(data, origin, env if secret_env is None else secret_env)
    if path is None:
        resolved += _legacy_secrets(env)
    settings = parse_settings(data, origin)
    keep_resolved(settings, resolved)
    return settings
