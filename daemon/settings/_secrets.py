"""Secrets in the configuration: resolved when it is loaded, and handed to the redactor.

A header or query parameter value may be a table ``{ secret = "api_token" }`` (optionally with
``prefix = "Bearer "``), resolved when the config is loaded from the file
``$CREDENTIALS_DIRECTORY/api_token`` (systemd ``LoadCredential=``), else from the environment
variable ``COLETA_SECRET_API_TOKEN``. A missing secret is a ConfigError naming the key; a
secret's value is never logged. A resolved header or parameter value is a ``SecretValue`` (a
``str``; msgspec keeps the subclass when it converts the config), so the fetcher knows to send
it only to the source's origins, like ``[sources.auth]``. ``secrets_of(settings)`` gives every
secret value the settings hold — those resolved from references when the file was loaded, the
``[sources.auth]`` credentials, the passwords in ``nats_url`` / ``database_url`` — for the
redactor (``platform.redact``), which masks them in every text that leaves the process.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from daemon.errors import ConfigError
from daemon.platform.redact import Secret
from daemon.settings._auth import (
    AUTH_SECRET_FIELDS,
    ApiKeyAuth,
    Auth,
    BasicAuth,
    BearerAuth,
    SecretValue,
)
from daemon.settings._settings import Settings

__all__ = ["keep_resolved", "resolve_secret", "resolve_secrets", "secrets_of"]


_SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def resolve_secret(key: str, ref: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, str]:
    """The prefix and the value of ``{ secret = "name", prefix = "…" }`` at ``key``;
    ConfigError if missing."""
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
            return prefix, (Path(directory) / name).read_text().rstrip("\r\n")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"{key}: secret {name!r}: cannot read: {exc.strerror}") from None
    if (value := env.get(var)) is not None:
        return prefix, value
    raise ConfigError(
        f"{key}: secret {name!r} not found (no file $CREDENTIALS_DIRECTORY/{name},"
        f" no variable {var})"
    )


def resolve_secrets(
    data: dict[str, Any], origin: str, env: Mapping[str, str]
) -> list[tuple[int, Secret]]:
    """Replace every ``{ secret = … }`` header, parameter or auth value in place; returns
    each value resolved (its prefix left out), with the index of its source."""
    resolved: list[tuple[int, Secret]] = []
    sources = data.get("sources")
    if not isinstance(sources, list):
        return resolved
    for i, source in enumerate(sources):
        if not isinstance(source, dict):
            continue
        for table in ("headers", "params"):
            values = source.get(table)
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                if isinstance(value, dict):
                    where = f"sources[{i}].{table}.{name}"
                    prefix, secret = resolve_secret(f"{origin}: {where}", value, env)
                    if table == "params":
                        resolved.append((i, Secret(where, secret, param=str(name))))
                        # Parameters are templates: a brace in a secret must stay a brace.
                        secret = secret.replace("{", "{{").replace("}", "}}")
                        prefix = prefix.replace("{", "{{").replace("}", "}}")
                    else:
                        resolved.append((i, Secret(where, secret, header=str(name))))
                    values[name] = SecretValue(prefix + secret)
        if isinstance(auth := source.get("auth"), dict):
            for where, secret in _resolve_auth(auth, f"sources[{i}].auth", origin, env):
                resolved.append((i, Secret(where, secret)))
    return resolved


def _resolve_auth(
    auth: dict[str, Any], key: str, origin: str, env: Mapping[str, str]
) -> Iterator[tuple[str, str]]:
    """Secret fields must be references; any field may be one (``client_id`` too). Yields
    where each reference was and its value."""
    for name, value in auth.items():
        if isinstance(value, dict):
            prefix, secret = resolve_secret(f"{origin}: {key}.{name}", value, env)
            auth[name] = prefix + secret
            yield f"{key}.{name}", secret
        elif name in AUTH_SECRET_FIELDS:
            # Never echo the value: it is a secret written where it does not belong.
            raise ConfigError(
                f"{origin}: {key}.{name}: an inline secret is not allowed; write"
                f' {name} = {{ secret = "<name>" }} and put the value in'
                " $CREDENTIALS_DIRECTORY/<name> or COLETA_SECRET_<NAME>"
            )


#: Per live ``SourceConfig`` (by ``id``): the secrets its values were resolved from.
_RESOLVED: dict[int, tuple[Secret, ...]] = {}


def keep_resolved(settings: Settings, resolved: list[tuple[int, Secret]]) -> None:
    for i, source in enumerate(settings.sources):
        secrets = tuple(secret for index, secret in resolved if index == i)
        if secrets:
            _RESOLVED[id(source)] = secrets
            weakref.finalize(source, _RESOLVED.pop, id(source), None)


def secrets_of(settings: Settings) -> list[Secret]:
    """Every secret value ``settings`` hold, with where it is configured and how it travels.

    What references resolved when the file was loaded (``load_settings``); the credentials
    of every ``[sources.auth]``, however the settings were built; and the passwords in
    ``nats_url`` and ``database_url``.
    """
    found: list[Secret] = []
    if settings.nats_password:
        found.append(Secret("nats_password", settings.nats_password))
    for field in ("nats_url", "database_url"):
        for server in (getattr(settings, field) or "").split(","):
            try:
                password = urlsplit(server.strip()).password
            except ValueError:
                continue
            if password:
                found.append(Secret(field, unquote(password)))
    for i, source in enumerate(settings.sources):
        found.extend(_RESOLVED.get(id(source), ()))
        if source.auth is not None:
            found.extend(_auth_secrets(f"sources[{i}].auth", source.auth))
    return found


def _auth_secrets(key: str, auth: Auth) -> list[Secret]:
    if isinstance(auth, BearerAuth):
        return [Secret(f"{key}.token", auth.token, header="Authorization")]
    if isinstance(auth, ApiKeyAuth):
        return [Secret(f"{key}.key", auth.key, param=auth.param, header=auth.header)]
    if isinstance(auth, BasicAuth):
        return [
            Secret(
                f"{key}.password", auth.password, header="Authorization", basic_user=auth.username
            )
        ]
    client = auth.client_id if auth.client_auth == "basic" else None
    return [Secret(f"{key}.client_secret", auth.client_secret, basic_user=client)]
