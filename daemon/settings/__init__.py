"""Configuration: config structs (frozen, unknown keys forbidden) and their loading.

``load_settings`` reads a TOML file (or the environment alone), resolves its secrets, applies
the environment's overrides and validates everything into ``Settings``; every error is a
``ConfigError`` naming the key path and the value. The settings import no stage: what they
check is pure logic (``daemon.schedule``, ``daemon.template``, ``daemon.jsonpath``).
"""

from daemon.settings._auth import (
    AUTH_SECRET_FIELDS,
    ApiKeyAuth,
    Auth,
    BasicAuth,
    BearerAuth,
    OAuth2Auth,
    SecretValue,
)
from daemon.settings._load import (
    NATS_ENV,
    apply_nats_env,
    load_settings,
    parse_settings,
    read_toml,
)
from daemon.settings._pagination import Pagination
from daemon.settings._secrets import resolve_secrets, secrets_of
from daemon.settings._settings import MAX_WORKERS, ROLES, Settings, parse_roles, with_workers
from daemon.settings._source import Incremental, Retries, SourceConfig, default_freshness_s
from daemon.settings._units import SECONDS, format_duration, parse_duration, parse_rate

__all__ = [
    "AUTH_SECRET_FIELDS",
    "MAX_WORKERS",
    "NATS_ENV",
    "ROLES",
    "SECONDS",
    "ApiKeyAuth",
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "Incremental",
    "OAuth2Auth",
    "Pagination",
    "Retries",
    "SecretValue",
    "Settings",
    "SourceConfig",
    "apply_nats_env",
    "default_freshness_s",
    "format_duration",
    "load_settings",
    "parse_duration",
    "parse_rate",
    "parse_roles",
    "parse_settings",
    "read_toml",
    "resolve_secrets",
    "secrets_of",
    "with_workers",
]
