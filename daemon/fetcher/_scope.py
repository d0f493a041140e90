"""Credentials go to their origins only: the one rule every hop of a request passes.

Credentials belong to the origin (scheme, host, port) of the source's URL, and to the origins
in ``auth_origins``: ``[sources.auth]``, secret-valued headers and parameters
(``settings.SecretValue``), an ``Authorization``, ``Proxy-Authorization`` or ``Cookie`` header
however configured, and user:password in the URL. A request built by ``_request`` records the
origin of the run's URL (``ORIGIN``); the auth flow (``Scope``, an ``httpx.Auth``) puts the
send's rule (``CREDENTIALS``) on the request, and the client's request hook (``_client``) hands
it every hop — the request, each redirect — before it goes out. A hop to one of those origins
carries all of them; one to any other origin (a next page on another host, a redirect away)
carries none, and a query parameter named as one or holding one's value is taken off it. A 401
from another origin fetches no new OAuth token. The token request itself is confined to the
token endpoint's origin: a redirect elsewhere fails it.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_plus

import httpx

from daemon.errors import RedirectRefused
from daemon.platform.logs import get_logger
from daemon.platform.redact import shown_url
from daemon.settings import OAuth2Auth

__all__ = [
    "CREDENTIALS",
    "ORIGIN",
    "CredentialScope",
    "OAuthGrant",
    "Scope",
    "Token",
    "Tokens",
    "basic",
    "origin_of",
]

log = get_logger("auth")

#: Request extension: the origin (``origin_of``) the request's credentials were configured for,
#: the run's URL's; copied to its later pages and kept through redirects.
ORIGIN = "coleta.origin"
#: Request extension: the ``CredentialScope`` of the send in progress, if any.
CREDENTIALS = "coleta.credentials"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: httpx.URL) -> str:
    """``scheme://host:port`` of ``url``, the port always written: the key credentials are
    scoped by (``https://a.example`` and ``https://a.example:443`` are one origin)."""
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{url.port or _DEFAULT_PORTS.get(url.scheme, 0)}"


class CredentialScope(Protocol):
    """What a request may carry on each hop (``Scope``): all its credentials to an origin they
    belong to, none of them anywhere else."""

    async def scope(self, request: httpx.Request) -> None: ...


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    #: Monotonic time after which it is fetched again.
    refresh_at: float


class Tokens(Protocol):
    """Where OAuth tokens come from (``_auth.Credentials``): cached, or fetched again."""

    async def token(
        self, source: str, config: OAuth2Auth, *, stale: Token | None = None
    ) -> Token: ...


#: Headers that carry credentials whatever the config calls them (a plain ``Authorization``
#: header, user:password in the URL): never sent to another origin either.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


@dataclass(frozen=True, slots=True)
class OAuthGrant:
    """A source's OAuth client credentials, and who fetches its tokens."""

    tokens: Tokens
    source: str
    config: OAuth2Auth


class Scope(httpx.Auth):
    """A source's credentials and the origins they may go to, as an ``httpx.Auth``.

    httpx runs an auth flow once per send, before any redirect, while the client's request hook
    (``_client.open_client``) sees every hop. So the flow only hands the send's ``_Send`` to the
    hook (``CREDENTIALS``), which applies the one rule to each hop; the flow keeps what only
    it sees, the final response: a 401 from an origin of the credentials fetches a new OAuth
    token once.
    """

    def __init__(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        secrets: frozenset[str] = frozenset(),
        origins: frozenset[str] = frozenset(),
        oauth: OAuthGrant | None = None,
        userinfo: bool = True,
        confined: bool = False,
    ) -> None:
        self.headers = dict(headers or {})
        self.params = dict(params or {})
        #: Credential values: a query parameter carrying one (an API echoing it into a next-page
        #: URL, under any name) does not go to another origin either.
        self.secrets = frozenset(secret for secret in secrets if secret)
        self.origins = origins
        self.oauth = oauth
        #: user:password in the URL is Basic auth, as httpx makes it when no auth is given.
        self.userinfo = userinfo
        #: Refuse a hop to another origin instead of sending it bare (the token request: its
        #: body may hold the client secret).
        self.confined = confined

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        send = _Send(self, request)
        request.extensions[CREDENTIALS] = send
        try:
            response = yield request
            oauth, stale = self.oauth, send.token
            if (
                oauth is not None
                and stale is not None
                and response.status_code == 401
                and send.allows(response.request.url)
            ):
                log.info("auth.token_rejected", extra={"source": oauth.source})
                await oauth.tokens.token(oauth.source, oauth.config, stale=stale)
                yield request  # the hook puts the new token on it
        finally:
            request.extensions.pop(CREDENTIALS, None)


class _Send:
    """One send's credentials: the rule the client's request hook applies to every hop."""

    def __init__(self, scope: Scope, request: httpx.Request) -> None:
        self._scope = scope
        home = request.extensions.get(ORIGIN)
        # A request not built by ``_request.build_request`` belongs to the origin it is sent to.
        home = home if isinstance(home, str) else origin_of(request.url)
        self._origins = scope.origins | {home}
        # Credential headers the request came with (a plain Authorization header, one a
        # previous page got) are its own: they go back on when a redirect returns home.
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in _CREDENTIAL_HEADERS
        }
        headers.update(scope.headers)
        if scope.userinfo and (request.url.username or request.url.password):
            headers["Authorization"] = basic(request.url.username, request.url.password)
        self._headers = headers
        self._drop = _CREDENTIAL_HEADERS | {name.lower() for name in headers}
        #: The OAuth token last sent, the one a 401 refuses.
        self.token: Token | None = None

    def allows(self, url: httpx.URL) -> bool:
        return origin_of(url) in self._origins

    async def scope(self, request: httpx.Request) -> None:
        """All the credentials on ``request`` if it goes to one of their origins; else none."""
        if self.allows(request.url):
            for name, value in self._headers.items():
                request.headers[name] = value
            if (oauth := self._scope.oauth) is not None:
                self.token = await oauth.tokens.token(oauth.source, oauth.config)
                request.headers["Authorization"] = f"Bearer {self.token.value}"
            if self._scope.params:
                request.url = _with_params(request.url, self._scope.params)
            return
        if self._scope.confined:
            location = str(request.url)
            raise RedirectRefused(
                location,
                "it would take the credentials to another origin",
                request=request,
                shown=shown_url(location),
            )
        for name in [name for name in request.headers if name.lower() in self._drop]:
            del request.headers[name]
        secrets = self._scope.secrets
        if self.token is not None:
            secrets |= {self.token.value}
        names = set(self._scope.params)
        request.url = _without_params(
            request.url, lambda name, value: name in names or value in secrets
        )


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _pairs(url: httpx.URL) -> list[tuple[bytes, str, str]]:
    """Each ``name=value`` of the query string: as sent, and decoded."""
    pairs = []
    for raw in url.query.split(b"&"):
        if raw:
            name, _, value = raw.decode("ascii", "replace").partition("=")
            pairs.append((raw, unquote_plus(name), unquote_plus(value)))
    return pairs


def _without_params(url: httpx.URL, drop: Callable[[str, str], bool]) -> httpx.URL:
    """``url`` without the query parameters ``drop`` names; the others exactly as they were
    (re-encoding a query string can break an API's signed or odd URL)."""
    pairs = _pairs(url)
    kept = [raw for raw, name, value in pairs if not drop(name, value)]
    return url if len(kept) == len(pairs) else url.copy_with(query=b"&".join(kept) or None)


def _with_params(url: httpx.URL, params: Mapping[str, str]) -> httpx.URL:
    """``url`` with ``params`` (once each); the other parameters as they were."""
    present = {(name, value) for _, name, value in _pairs(url)}
    if all(item in present for item in params.items()):
        return url
    kept = _without_params(url, lambda name, value: name in params)
    query = b"&".join(filter(None, [kept.query, str(httpx.QueryParams(params)).encode("ascii")]))
    return url.copy_with(query=query)
