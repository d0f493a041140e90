"""Secrets in config values: { secret = "name" } from $CREDENTIALS_DIRECTORY, then the env;
and every secret the settings hold given to the redactor, at start and at every reload."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from daemon.app import open_daemon
from daemon.app._reload import reload_config
from daemon.errors import ConfigError
from daemon.platform import logs
from daemon.platform.redact import MIN_CHARS, Secret, redact_text
from daemon.settings import load_settings, parse_settings, secrets_of

CONFIG = """
[[sources]]
name = "api"
url = "http://127.0.0.1:9/data"
schedule = "0 6 * * *"
headers = { Authorization = { secret = "api_token", prefix = "Bearer " }, Accept = "text/csv" }
params = { key = { secret = "query.key" } }
"""


def config(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "coleta.toml"
    path.write_text(text)
    return path


def test_credentials_directory_first_then_environment(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_token").write_text("from-file\n")
    env = {
        "CREDENTIALS_DIRECTORY": str(creds),
        "COLETA_SECRET_API_TOKEN": "from-env",
        "COLETA_SECRET_QUERY_KEY": "k{1}",
    }
    (source,) = load_settings(config(tmp_path), env=env).sources
    assert source.headers == {"Authorization": "Bearer from-file", "Accept": "text/csv"}
    # Parameters are templates: braces in a secret are kept literally.
    assert source.params == {"key": "k{{1}}"}

    del env["CREDENTIALS_DIRECTORY"]
    (source,) = load_settings(config(tmp_path), env=env).sources
    assert source.headers["Authorization"] == "Bearer from-env"


def test_a_missing_secret_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = config(tmp_path)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, env={"COLETA_SECRET_API_TOKEN": "t"})
    assert str(raised.value) == (
        f"{path}: sources[0].params.key: secret 'query.key' not found"
        " (no file $CREDENTIALS_DIRECTORY/query.key, no variable COLETA_SECRET_QUERY_KEY)"
    )


def test_a_secret_table_with_a_typo_is_an_error(tmp_path: Path) -> None:
    path = config(tmp_path, CONFIG.replace('prefix = "Bearer "', 'prefx = "Bearer "'))
    with pytest.raises(ConfigError) as raised:
        load_settings(path, env={"COLETA_SECRET_API_TOKEN": "t", "COLETA_SECRET_QUERY_KEY": "k"})
    assert str(raised.value) == (
        f"{path}: sources[0].headers.Authorization.prefx: unknown key"
        " (a secret takes secret and prefix)"
    )


# -- what the redactor is fed ---------------------------------------------------------------

FULL = """
[[sources]]
name = "api"
url = "http://127.0.0.1:9/data"
schedule = "0 6 * * *"
headers = { X-Tenant = { secret = "tenant", prefix = "T " } }
params = { appid = { secret = "appid" } }
auth = { kind = "basic", username = { secret = "user" }, password = { secret = "pass" } }

[[sources]]
name = "oauth"
url = "http://127.0.0.1:9/data"
schedule = "0 6 * * *"
[sources.auth]
kind = "oauth2"
token_url = "http://127.0.0.1:9/token"
client_id = "c1"
client_secret = { secret = "client" }
"""

FULL_ENV = {
    "COLETA_SECRET_TENANT": "tenant-value",
    "COLETA_SECRET_APPID": "app{id}-value",
    "COLETA_SECRET_USER": "user-value",
    "COLETA_SECRET_PASS": "pass-value",
    "COLETA_SECRET_CLIENT": "client-value",
    "NATS_URL": "nats://coleta:nats-password@127.0.0.1:4222",
}


def test_every_secret_the_settings_hold_is_given_to_the_redactor(tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path, FULL), env=FULL_ENV)
    assert sorted(secrets_of(settings), key=lambda s: s.where) == [
        Secret("nats_url", "nats-password"),
        Secret("sources[0].auth.password", "pass-value"),
        Secret(
            "sources[0].auth.password",
            "pass-value",
            header="Authorization",
            basic_user="user-value",
        ),
        Secret("sources[0].auth.username", "user-value"),
        # Without its prefix: "T tenant-value" holds it.
        Secret("sources[0].headers.X-Tenant", "tenant-value", header="X-Tenant"),
        # As resolved, not as the template it became ("app{{id}}-value").
        Secret("sources[0].params.appid", "app{id}-value", param="appid"),
        Secret("sources[1].auth.client_secret", "client-value"),
        Secret("sources[1].auth.client_secret", "client-value", basic_user="c1"),
    ]
    # The values went where they belong, as before.
    api = settings.sources[0]
    assert (api.headers, api.params) == (
        {"X-Tenant": "T tenant-value"},
        {"appid": "app{{id}}-value"},
    )


def test_settings_built_without_a_file_still_give_their_credentials() -> None:
    settings = parse_settings(
        {
            "database_url": "postgresql://coleta:db%2Fpw@db/coleta",
            "sources": [
                {
                    "name": "keyed",
                    "url": "http://127.0.0.1:9/",
                    "schedule": "0 6 * * *",
                    "auth": {"kind": "api_key", "param": "k", "key": "key-value"},
                }
            ],
        }
    )
    assert secrets_of(settings) == [
        Secret("database_url", "db/pw"),
        Secret("sources[0].auth.key", "key-value", param="k"),
    ]


def test_the_original_setup_gives_its_key(tmp_path: Path) -> None:
    env = {"EXTERNAL_API_URL": "http://127.0.0.1:9/x", "EXTERNAL_API_KEY": "legacy-key"}
    settings = load_settings(None, env=env)
    assert secrets_of(settings) == [
        Secret("EXTERNAL_API_KEY", "legacy-key", header="Authorization")
    ]


@pytest.mark.anyio
async def test_start_and_reload_feed_the_redactor_and_warn_of_short_secrets(
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    top = (
        f'nats_url = "{nats_url}"\ndatabase_url = "{database_url}"\n'
        f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
    )
    table = """
[[sources]]
name = "{name}"
url = "http://127.0.0.1:9/data"
schedule = "0 6 * * *"
params = {{ appid = {{ secret = "{secret}" }}, pin = {{ secret = "pin" }} }}
"""
    path = config(tmp_path, top + table.format(name="first", secret="first"))
    monkeypatch.setenv("COLETA_SECRET_FIRST", "first-secret-value")
    monkeypatch.setenv("COLETA_SECRET_SECOND", "second-secret-value")
    monkeypatch.setenv("COLETA_SECRET_PIN", "42")
    out = io.StringIO()
    logs.setup_logging("INFO", stream=out)
    try:
        async with open_daemon(load_settings(path)) as daemon:
            assert redact_text("first-secret-value") == "REDACTED"
            assert redact_text("second-secret-value") == "second-secret-value"
            path.write_text(top + table.format(name="second", secret="second"))
            assert await reload_config(daemon, path)
            assert redact_text("second-secret-value first-secret-value") == "REDACTED REDACTED"
            # Masked by the name it is sent as, not by value: "42" is in too many texts.
            assert redact_text("42 http://h/?pin=42") == "42 http://h/?pin=REDACTED"
        assert redact_text("second-secret-value") == "second-secret-value"
    finally:
        logs._reset_for_tests()
    warnings = [json.loads(line) for line in out.getvalue().splitlines() if "too_short" in line]
    assert [(w["event"], w["keys"], w["min_chars"]) for w in warnings] == [
        ("secrets.too_short", ["sources[0].params.pin"], MIN_CHARS)
    ] * 2
