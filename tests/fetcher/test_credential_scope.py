"""Credentials go only to the origin they were configured for (and ``auth_origins``).

Two local APIs on two origins: ``home`` (127.0.0.1, the source's URL) answers 401 to any
request without the credentials; ``away`` (127.0.0.2) records whatever reaches it. Each kind of
credential runs the daemon end to end over every way a request leaves the origin: a next-page
URL in the body, a ``Link`` header, a 302, a 307, and a redirect chain that comes back home.
Where the credential travels as a query parameter, the API echoes it in the URLs it hands out,
as many do.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from daemon.app import open_daemon
from daemon.errors import ConfigError
from daemon.settings import resolve_secrets
from tests._collect import run
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI, Route, Seen

pytestmark = pytest.mark.anyio

#: Where ``{ secret = "…" }`` references resolve (``resolve_secrets``).
SECRET_ENV = {
    "COLETA_SECRET_TOKEN": "t0ken-abc",
    "COLETA_SECRET_KEY": "k3y-abc",
    "COLETA_SECRET_PASSWORD": "pa55-abc",
    "COLETA_SECRET_CLIENT": "cl1ent-s3cret",
    "COLETA_SECRET_SIGNATURE": "h3ader-abc",
    "COLETA_SECRET_APPID": "p4ram-abc",
}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Home(LocalAPI):
    """The source's API: every request must pass ``accepts`` (401 otherwise); ``/token`` is an
    OAuth token endpoint for client ``coleta`` / ``cl1ent-s3cret``, issuing ``oauth-tok-<n>``."""

    def __init__(self) -> None:
        super().__init__()
        self.accepts: Callable[[Seen], bool] = lambda seen: True
        self.issued: list[str] = []
        self._issue = threading.Lock()

    def _take(self, path: str, seen: Seen) -> Route:
        if path == "/token":
            answer: Route | None = self._token(seen)
        else:
            answer = None if self.accepts(seen) else Route(status=401, body=b"unauthorized")
        if answer is None:
            return super()._take(path, seen)
        with self._lock:
            self.requests.append(seen)
        return answer

    def _token(self, seen: Seen) -> Route | None:
        if "client_secret=cl1ent-s3cret" not in seen.body.decode():
            return Route(status=401, body=b'{"error": "invalid_client"}')
        with self._issue:
            token = f"oauth-tok-{len(self.issued) + 1}"
            self.issued.append(token)
        body = {"access_token": token, "expires_in": 3600}
        return Route(body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


@pytest.fixture
def home() -> Iterator[Home]:
    server = Home()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def away(other_api: LocalAPI) -> LocalAPI:
    """Another origin, recording whatever reaches it."""
    return other_api


@dataclass(frozen=True)
class Kind:
    """A kind of credential: the source keys that configure it, what ``home`` demands, the
    strings that must never reach ``away``, and the query parameter it travels in, if any."""

    config: Callable[[Home], dict[str, Any]]
    accepts: Callable[[Seen], bool]
    secrets: tuple[str, ...]
    param: tuple[str, str] | None = None
    userinfo: str = ""


def header(name: str, value: str) -> Callable[[Seen], bool]:
    return lambda seen: seen.headers.get(name) == value


def param(name: str, value: str) -> Callable[[Seen], bool]:
    return lambda seen: seen.query.get(name) == [value]


KINDS = {
    "bearer": Kind(
        config=lambda home: {"auth": {"kind": "bearer", "token": {"secret": "token"}}},
        accepts=header("authorization", "Bearer t0ken-abc"),
        secrets=("t0ken-abc",),
    ),
    "api_key-header": Kind(
        config=lambda home: {
            "auth": {"kind": "api_key", "key": {"secret": "key"}, "header": "X-Api-Key"}
        },
        accepts=header("x-api-key", "k3y-abc"),
        secrets=("k3y-abc",),
    ),
    "api_key-param": Kind(
        config=lambda home: {"auth": {"kind": "api_key", "key": {"secret": "key"}, "param": "key"}},
        accepts=param("key", "k3y-abc"),
        secrets=("k3y-abc",),
        param=("key", "k3y-abc"),
    ),
    "basic": Kind(
        config=lambda home: {
            "auth": {"kind": "basic", "username": "ana", "password": {"secret": "password"}}
        },
        accepts=header("authorization", basic("ana", "pa55-abc")),
        secrets=("pa55-abc", basic("ana", "pa55-abc").removeprefix("Basic ")),
    ),
    "oauth2": Kind(
        config=lambda home: {
            "auth": {
                "kind": "oauth2",
                "token_url": home.url("/token"),
                "client_id": "coleta",
                "client_secret": {"secret": "client"},
                "client_auth": "body",
            }
        },
        # Each source gets its own token (checked against those issued below).
        accepts=lambda seen: (
            re.fullmatch(r"Bearer oauth-tok-\d", seen.headers.get("authorization", "")) is not None
        ),
        secrets=("oauth-tok-", "cl1ent-s3cret"),
    ),
    "secret-header": Kind(
        config=lambda home: {"headers": {"X-Signature": {"secret": "signature"}}},
        accepts=header("x-signature", "h3ader-abc"),
        secrets=("h3ader-abc",),
    ),
    "secret-param": Kind(
        config=lambda home: {"params": {"appid": {"secret": "appid"}}},
        accepts=param("appid", "p4ram-abc"),
        secrets=("p4ram-abc",),
        param=("appid", "p4ram-abc"),
    ),
    # Not a [sources.auth] kind, but credentials all the same: an Authorization header written
    # as a plain header, and user:password in the source's URL.
    "authorization-header": Kind(
        config=lambda home: {"headers": {"Authorization": "Token plain-abc"}},
        accepts=header("authorization", "Token plain-abc"),
        secrets=("plain-abc",),
    ),
    "userinfo": Kind(
        config=lambda home: {},
        accepts=header("authorization", basic("ana", "u5er-abc")),
        secrets=("u5er-abc", basic("ana", "u5er-abc").removeprefix("Basic ")),
        userinfo="ana:u5er-abc@",
    ),
}


def source_for(kind: Kind, home: Home, name: str, path: str, **extra: Any) -> dict[str, Any]:
    """A triggered-only source of ``kind`` on ``home``, with its secrets resolved the way
    ``load_settings`` resolves them, and a plain header that may go anywhere."""
    config = kind.config(home)
    url = home.url(path).replace("http://", f"http://{kind.userinfo}")
    source = {"name": name, "url": url, "schedule": "0 0 1 1 *", **config, **extra}
    source["headers"] = {"X-Plain": "visible", **config.get("headers", {})}
    source["retries"] = {"max_attempts": 1}
    data = {"sources": [source]}
    resolve_secrets(data, "test", SECRET_ENV)
    return source


def echo(kind: Kind, **query: str) -> str:
    """The query string of a URL the API hands out: the credential echoed, if a parameter."""
    if kind.param is not None:
        query = {kind.param[0]: kind.param[1], **query}
    return f"?{urlencode(query)}" if query else ""


def script(kind: Kind, home: Home, away: LocalAPI) -> list[dict[str, Any]]:
    """One source per way out of the origin, each scripted on both APIs; every one comes back
    home (``next_url``, ``link``, ``chain``) or ends away (``r302``, ``r307``)."""
    # A next-page URL in the body: home → away → home.
    home.route("/next_url/1", json={"items": [1], "next": away.url("/next_url/2") + echo(kind)})
    away.route("/next_url/2", json={"items": [2], "next": home.url("/next_url/3?page=3")})
    home.route("/next_url/3", json={"items": [3], "next": None})
    # A Link header: home → away → home.
    link = away.url("/link/2") + echo(kind, page="2")
    home.route("/link/1", json={"items": [1]}, headers={"Link": f'<{link}>; rel="next"'})
    back = home.url("/link/3?page=3")
    away.route("/link/2", json={"items": [2]}, headers={"Link": f'<{back}>; rel="next"'})
    home.route("/link/3", json={"items": [3]})
    # Redirects that leave for good.
    for status in (302, 307):
        target = away.url(f"/r{status}/moved") + echo(kind)
        home.route(f"/r{status}", status=status, headers={"Location": target})
        away.route(f"/r{status}/moved", json={"items": [1]})
    # There and back again: home → 302 → away → 307 → home.
    home.route("/chain", status=302, headers={"Location": away.url("/chain/hop") + echo(kind)})
    away.route("/chain/hop", status=307, headers={"Location": home.url("/chain/back")})
    home.route("/chain/back", json={"items": [1]})
    next_url = {"kind": "next_url", "next_url_path": "next", "records_path": "items"}
    return [
        source_for(kind, home, "next_url", "/next_url/1", pagination=next_url),
        source_for(kind, home, "link", "/link/1", pagination={"kind": "link"}),
        source_for(kind, home, "r302", "/r302"),
        source_for(kind, home, "r307", "/r307"),
        source_for(kind, home, "chain", "/chain"),
    ]


def leaks(seen: Seen, secrets: tuple[str, ...]) -> list[str]:
    """What of ``secrets`` (or any Authorization) reached a server in ``seen``."""
    found = [name for name in ("authorization", "cookie") if name in seen.headers]
    text = json.dumps([seen.headers, seen.query, seen.body.decode()])
    return found + [secret for secret in secrets if secret in text]


@pytest.mark.parametrize("name", list(KINDS))
async def test_credentials_never_leave_the_origin_and_come_back_with_it(
    name: str,
    home: Home,
    away: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    kind = KINDS[name]
    home.accepts = kind.accepts
    sources = script(kind, home, away)
    async with open_daemon(make_settings(sources)):
        rows = {s["name"]: await run(request_reply, db_conn, s["name"]) for s in sources}
    # The origin got the credentials on every request, those after a foreign hop included.
    outcomes = {s: (row["status"], row["pages"], row["error"]) for s, row in rows.items()}
    assert outcomes == {
        "next_url": ("stored", 3, None),
        "link": ("stored", 3, None),
        "r302": ("stored", 1, None),
        "r307": ("stored", 1, None),
        "chain": ("stored", 1, None),
    }
    assert all(kind.accepts(seen) for seen in home.requests if seen.path != "/token")
    for path in ("/next_url/3", "/link/3", "/chain/back"):
        assert len(home.hits(path)) == 1, path
    # The other origin got every request, with the plain header and none of the credentials.
    assert sorted(seen.path for seen in away.requests) == [
        "/chain/hop",
        "/link/2",
        "/next_url/2",
        "/r302/moved",
        "/r307/moved",
    ]
    assert {seen.path: leaks(seen, kind.secrets) for seen in away.requests} == {
        seen.path: [] for seen in away.requests
    }
    assert all(seen.headers.get("x-plain") == "visible" for seen in away.requests)
    # OAuth: one token per source, fetched once: no foreign hop asked for another.
    issued = [f"oauth-tok-{n}" for n in range(1, 6)] if name == "oauth2" else []
    assert home.issued == issued
    if issued:
        sent = {seen.headers["authorization"] for seen in home.requests if seen.path != "/token"}
        assert sent == {f"Bearer {token}" for token in issued}


async def test_a_401_from_another_origin_fetches_no_new_token(
    home: Home,
    away: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    kind = KINDS["oauth2"]
    home.accepts = kind.accepts
    home.route("/data", status=302, headers={"Location": away.url("/denied")})
    away.route("/denied", status=401, body=b"who are you?")
    source = source_for(kind, home, "oauth", "/data")
    async with open_daemon(make_settings([source])):
        row = await run(request_reply, db_conn, "oauth")
    assert (row["status"], row["http_status"]) == ("failed", 401)
    assert home.issued == ["oauth-tok-1"]
    (denied,) = away.hits("/denied")
    assert leaks(denied, kind.secrets) == []


async def test_a_token_endpoint_redirecting_to_another_origin_gets_no_client_secret(
    home: Home,
    away: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    away.route("/token", json={"access_token": "stolen", "expires_in": 3600})
    home.route("/moved-token", status=307, headers={"Location": away.url("/token")})
    kind = KINDS["oauth2"]
    source = source_for(kind, home, "oauth", "/data")
    source["auth"]["token_url"] = home.url("/moved-token")
    async with open_daemon(make_settings([source])):
        row = await run(request_reply, db_conn, "oauth")
    assert (row["status"], row["error_code"]) == ("failed", "auth")
    assert "another origin" in row["error"]
    assert [leaks(seen, kind.secrets) for seen in away.requests] == []
    assert not home.hits("/data")


async def test_auth_origins_lets_the_credentials_follow_to_the_origins_listed(
    home: Home,
    away: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    bearer, appid = KINDS["bearer"], KINDS["secret-param"]
    home.accepts = lambda seen: bearer.accepts(seen) and appid.accepts(seen)
    away.route("/cdn/2", json={"items": [2], "next": None})
    home.route("/pages/1", json={"items": [1], "next": away.url("/cdn/2")})
    home.route("/moved", status=307, headers={"Location": away.url("/cdn/moved")})
    away.route("/cdn/moved", json={"items": [1]})
    cdn = f"http://127.0.0.2:{away.port}"

    def both() -> dict[str, Any]:
        return bearer.config(home) | appid.config(home) | {"auth_origins": [cdn]}

    next_url = {"kind": "next_url", "next_url_path": "next", "records_path": "items"}
    sources = [
        source_for(bearer, home, "pages", "/pages/1", pagination=next_url, **both()),
        source_for(bearer, home, "moved", "/moved", **both()),
    ]
    async with open_daemon(make_settings(sources)):
        rows = [await run(request_reply, db_conn, s["name"]) for s in sources]
    assert [row["status"] for row in rows] == ["stored", "stored"]
    assert sorted(seen.path for seen in away.requests) == ["/cdn/2", "/cdn/moved"]
    # The listed origin gets every credential: the token and the secret parameter alike.
    assert all(home.accepts(seen) for seen in away.requests)


@pytest.mark.parametrize(
    ("origin", "says"),
    [
        ("https://cdn.example.com/pages", "no path"),
        ("https://cdn.example.com?x=1", "no path"),
        ("https://ana:pw@cdn.example.com", "no path"),
        ("cdn.example.com", "not an origin"),
        ("ftp://cdn.example.com", "not an origin"),
        ("https://cdn.example.com:99999", "not an origin"),
    ],
)
def test_an_auth_origin_that_is_not_scheme_host_port_is_refused(
    make_settings: MakeSettings, origin: str, says: str
) -> None:
    source = {
        "name": "s",
        "url": "https://api.example.com/x",
        "schedule": "0 0 * * *",
        "auth_origins": ["https://ok.example.com", origin],
    }
    with pytest.raises(ConfigError) as caught:
        make_settings([source])
    message = str(caught.value)
    assert message.startswith("test: sources[0].auth_origins: ")
    assert repr(origin) in message
    assert says in message


def test_auth_origins_take_scheme_host_and_port(make_settings: MakeSettings) -> None:
    origins = ["https://cdn.example.com", "http://127.0.0.2:8080", "https://[::1]:8443/"]
    source = {
        "name": "s",
        "url": "https://api.example.com/x",
        "schedule": "0 0 * * *",
        "auth_origins": origins,
    }
    (parsed,) = make_settings([source]).sources
    assert parsed.auth_origins == origins
