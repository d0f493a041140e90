"""``[sources.auth]`` against local APIs that demand each kind, and an OAuth token endpoint."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import anyio
import psycopg
import pytest

from daemon.app import open_daemon
from tests._collect import run, source
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI, Route, Seen

pytestmark = pytest.mark.anyio


class GuardedAPI(LocalAPI):
    """A LocalAPI whose ``guard`` may answer a request first (401, a token, …)."""

    def __init__(self) -> None:
        super().__init__()
        self.guards: dict[str, Callable[[Seen], Route | None]] = {}

    def _take(self, path: str, seen: Seen) -> Route:
        guard = self.guards.get(path)
        answer = guard(seen) if guard is not None else None
        if answer is None:
            return super()._take(path, seen)
        with self._lock:
            self.requests.append(seen)
        return answer


@pytest.fixture
def guarded() -> Iterator[GuardedAPI]:
    server = GuardedAPI()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def unauthorized() -> Route:
    return Route(status=401, body=b'{"error": "unauthorized"}')


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("auth", "accepts"),
    [
        (
            {"kind": "bearer", "token": "t0ken-abc"},
            lambda seen: seen.headers.get("authorization") == "Bearer t0ken-abc",
        ),
        (
            {"kind": "api_key", "key": "k3y-abc", "header": "X-Api-Key"},
            lambda seen: seen.headers.get("x-api-key") == "k3y-abc",
        ),
        (
            {"kind": "api_key", "key": "k3y-abc", "param": "appid"},
            lambda seen: seen.query.get("appid") == ["k3y-abc"] and seen.query["day"] == ["1"],
        ),
        (
            {"kind": "basic", "username": "ana", "password": "pa55-abc"},
            lambda seen: seen.headers.get("authorization") == basic("ana", "pa55-abc"),
        ),
    ],
    ids=["bearer", "api_key-header", "api_key-param", "basic"],
)
async def test_each_kind_of_credentials_is_sent_and_kept_out_of_the_records(
    guarded: GuardedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    auth: dict[str, str],
    accepts: Callable[[Seen], bool],
) -> None:
    guarded.guards["/data"] = lambda seen: None if accepts(seen) else unauthorized()
    guarded.route("/data", json={"ok": True})
    source = {
        "name": "guarded",
        "url": guarded.url("/data?day=1"),
        "schedule": "0 0 1 1 *",
        "auth": auth,
    }
    async with open_daemon(make_settings([source])):
        row = await run(request_reply, db_conn, "guarded")
    assert row["status"] == "stored", row
    (hit,) = guarded.hits("/data")
    assert accepts(hit)
    secret = next(v for k, v in auth.items() if k in ("token", "key", "password"))
    stored = db_conn.execute(
        "SELECT r::text FROM collection_runs r UNION ALL SELECT d::text FROM collected_data d"
    ).fetchall()
    assert stored
    assert all(secret not in text for (text,) in stored)


async def test_missing_credentials_fail_the_run_with_401(
    guarded: GuardedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    guarded.guards["/data"] = lambda seen: unauthorized()
    async with open_daemon(make_settings([source(guarded, "guarded", "/data")])):
        row = await run(request_reply, db_conn, "guarded")
    assert (row["status"], row["http_status"], row["attempts"]) == ("failed", 401, 1)


class TokenEndpoint:
    """``/token`` issues ``tok-<n>`` for client ``coleta`` / ``s3cret``; ``/data`` accepts only
    tokens still valid, as the test decides (``revoke``)."""

    def __init__(self, api: GuardedAPI, *, expires_in: int) -> None:
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.forms: list[dict[str, list[str]]] = []
        self._lock = threading.Lock()
        api.guards["/token"] = self.token
        api.guards["/data"] = self.data
        api.route("/data", json={"ok": True})

    def token(self, seen: Seen) -> Route:
        form = parse_qs(seen.body.decode())
        self.forms.append(form)
        in_form = form.get("client_id") == ["coleta"] and form.get("client_secret") == ["s3cret"]
        if seen.headers.get("authorization") != basic("coleta", "s3cret") and not in_form:
            refused = {"error": "invalid_client", "error_description": "bad secret 'wrong-s3cret'"}
            return Route(status=401, body=json.dumps(refused).encode())
        with self._lock:
            token = f"tok-{len(self.issued) + 1}"
            self.issued.append(token)
            self.valid.add(token)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        return Route(body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

    def data(self, seen: Seen) -> Route | None:
        token = seen.headers.get("authorization", "").removeprefix("Bearer ")
        return None if token in self.valid else unauthorized()

    def revoke(self) -> None:
        self.valid.clear()


def oauth_source(api: LocalAPI, **auth: Any) -> dict[str, Any]:
    config = {
        "kind": "oauth2",
        "token_url": api.url("/token"),
        "client_id": "coleta",
        "client_secret": "s3cret",
        "scope": "read:data",
        "audience": "https://api.example",
    }
    return {
        "name": "oauth",
        "url": api.url("/data"),
        "schedule": "0 0 1 1 *",
        "retries": {"max_attempts": 2, "max_backoff_s": 0.1},
        "auth": config | auth,
    }


def bearer_tokens(api: LocalAPI) -> list[str]:
    return [seen.headers.get("authorization", "") for seen in api.hits("/data")]


async def test_oauth_token_is_cached_and_refreshed_before_it_expires(
    guarded: GuardedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    endpoint = TokenEndpoint(guarded, expires_in=1)
    async with open_daemon(make_settings([oauth_source(guarded)])):
        first = await run(request_reply, db_conn, "oauth")
        await anyio.sleep(1.1)  # the 1-second token is past its refresh time
        second = await run(request_reply, db_conn, "oauth")
    assert first["status"] == second["status"] == "stored"
    assert endpoint.issued == ["tok-1", "tok-2"]
    assert bearer_tokens(guarded) == ["Bearer tok-1", "Bearer tok-2"]
    assert endpoint.forms[0] == {
        "grant_type": ["client_credentials"],
        "scope": ["read:data"],
        "audience": ["https://api.example"],
    }


async def test_a_cached_token_serves_later_runs_until_its_refresh_time(
    guarded: GuardedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    endpoint = TokenEndpoint(guarded, expires_in=3600)
    async with open_daemon(make_settings([oauth_source(guarded, client_auth="body")])):
        for _ in range(3):
            assert (await run(request_reply, db_conn, "oauth"))["status"] == "stored"
    # client_auth = "body": the credentials travel as form fields, not as Basic auth.
    assert endpoint.issued == ["tok-1"]
    assert endpoint.forms[0]["client_secret"] == ["s3cret"]
    assert bearer_tokens(guarded) == ["Bearer tok-1"] * 3


async def test_a_token_the_api_refuses_with_401_is_fetched_again_once(
    guarded: GuardedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    endpoint = TokenEndpoint(guarded, expires_in=3600)
    async with open_daemon(make_settings([oauth_source(guarded)])):
        assert (await run(request_reply, db_conn, "oauth"))["status"] == "stored"
        endpoint.revoke()  # expired early on the server's side
        row = await run(request_reply, db_conn, "oauth")
    assert (row["status"], row["attempts"]) == ("stored", 1)
    assert endpoint.issued == ["tok-1", "tok-2"]
    assert bearer_tokens(guarded) == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]


async def test_a_token_endpoint_refusal_fails_the_run_without_leaking_the_secret(
    guarded: GuardedAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
) -> None:
    TokenEndpoint(guarded, expires_in=3600)
    source = oauth_source(guarded, client_secret="wrong-s3cret")
    async with open_daemon(make_settings([source])):
        row = await run(request_reply, db_conn, "oauth")
    assert (row["status"], row["error_code"], row["http_status"]) == ("failed", "auth", 401)
    assert row["error"].startswith(f"OAuth token request to {guarded.url('/token')}: HTTP 401")
    assert "invalid_client" in row["error"]
    assert "wrong-s3cret" not in row["error"]
    assert not guarded.hits("/data")
