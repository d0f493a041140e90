"""``coleta check-config`` on auth, rate_limit and jitter_s: one line naming the key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cli import main

SOURCE = '[[sources]]\nname = "a"\nurl = "http://x"\nschedule = "0 6 * * *"\n'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('rate_limit = "5/d"\n', "sources[0].rate_limit: '5/d' is not a rate like '5/s'"),
        ('rate_limit = "0/s"\n', "sources[0].rate_limit: '0/s' is not a rate"),
        ("rate_limit = 5\n", "sources[0].rate_limit: Expected `str | null`, got `int`"),
        ("jitter_s = -1\n", "sources[0].jitter_s: Expected `float` >= 0.0 (got -1)"),
        (
            "jitter_s = 86400\n",
            "sources[0].jitter_s: 86400 must be less than the schedule's shortest interval"
            " (86400 s)",
        ),
        ('[sources.auth]\nkind = "digest"\n', "sources[0].auth.kind: Invalid value 'digest'"),
        (
            '[sources.auth]\nusername = "u"\n',
            "sources[0].auth: Object missing required field `kind`",
        ),
        (
            '[sources.auth]\nkind = "bearer"\ntoken = "hunter2"\n',
            "sources[0].auth.token: an inline secret is not allowed; write"
            ' token = { secret = "<name>" }',
        ),
        (
            '[sources.auth]\nkind = "basic"\nusername = "u"\npassword = "hunter2"\n',
            "sources[0].auth.password: an inline secret is not allowed",
        ),
        (
            '[sources.auth]\nkind = "api_key"\nkey = { secret = "k" }\n',
            "sources[0].auth.header: give exactly one of header or param for an api_key",
        ),
        (
            '[sources.auth]\nkind = "api_key"\nkey = { secret = "k" }\nheader = "X-Key"\n'
            'param = "key"\n',
            "sources[0].auth.header: give exactly one of header or param",
        ),
        (
            '[sources.auth]\nkind = "bearer"\ntoken = { secret = "absent" }\n',
            "sources[0].auth.token: secret 'absent' not found",
        ),
        (
            '[sources.auth]\nkind = "bearer"\ntoken = { secret = "k" }\ntokn = "x"\n',
            "sources[0].auth.tokn: unknown key",
        ),
        (
            '[sources.auth]\nkind = "oauth2"\ntoken_url = "ftp://x"\nclient_id = "c"\n'
            'client_secret = { secret = "k" }\n',
            "sources[0].auth.token_url: 'ftp://x' must start with http:// or https://",
        ),
        (
            '[sources.auth]\nkind = "oauth2"\ntoken_url = "https://x/token"\nclient_id = "c"\n'
            'client_secret = { secret = "k" }\nclient_auth = "header"\n',
            "sources[0].auth.client_auth: Invalid enum value 'header'",
        ),
        (
            '[sources.auth]\nkind = "oauth2"\ntoken_url = "https://x/token"\n'
            'client_secret = { secret = "k" }\n',
            "sources[0].auth: Object missing required field `client_id`",
        ),
    ],
)
def test_each_bad_option_is_one_line_naming_the_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: str,
    expected: str,
) -> None:
    monkeypatch.setenv("COLETA_SECRET_K", "v4lue")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "bad.toml"
    path.write_text(SOURCE + extra)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"coleta: {path}: ")
    assert expected in err
    assert err.count("\n") == 1
    assert "hunter2" not in err
    assert "v4lue" not in err


def test_good_options_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLETA_SECRET_K", "v4lue")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "good.toml"
    path.write_text(
        SOURCE + 'rate_limit = "100/m"\njitter_s = 300\n'
        '[sources.auth]\nkind = "oauth2"\ntoken_url = "https://x/token"\n'
        'client_id = "c"\nclient_secret = { secret = "k" }\nscope = "read"\n'
        + '[[sources]]\nname = "b"\nurl = "http://x"\nschedule = "0 6 * * *"\n'
        'rate_limit = "2.5/s"\n[sources.auth]\nkind = "api_key"\nkey = { secret = "k" }\n'
        'param = "appid"\n'
    )
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert "ok (2 sources: a, b)" in capsys.readouterr().out
