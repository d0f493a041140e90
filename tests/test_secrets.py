"""Secrets in config values: { secret = "name" } from $CREDENTIALS_DIRECTORY, then the env."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.settings import load_settings

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
