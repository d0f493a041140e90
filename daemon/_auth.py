"""Credentials on the wire: ``[sources.auth]`` as httpx ``Auth`` flows, OAuth tokens cached.

``Credentials`` (one per fetcher, so per process) turns a source's auth config into an
``httpx.Auth`` applied when the request is sent (``_http.send(..., auth=…)``):

* ``bearer``  — ``Authorization: Bearer <token>``;
* ``api_key`` — the key in a header, or in a query parameter;
* ``basic``   — HTTP Basic;
* ``oauth2``  — client credentials: a token from ``token_url`` (fetched with the shared
  client), cached per source, fetched again ``refresh_margin_s`` (at most half its lifetime)
  before it expires, and fetched again once when the API answers 401 (revoked or expired
  early). One token request at a time per source: concurrent runs share the result.

Applied at send time, the credentials never appear in the URL or headers coleta records.
A token endpoint failure is a ``FetchTransient`` (connection, timeout, 429, 5xx) or a
``FetchPermanent`` (any other answer) with code ``auth``; its message carries the redacted
token URL, the status and the endpoint's ``error`` / ``error_description`` — never the
request's credentials or a token.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

import anyio
import httpx
import msgspec

from daemon._http import status_error
from daemon._logging import get_logger
from daemon._tracing import redact_text, redact_url
from daemon.errors import FetchPermanent, FetchTransient
from daemon.settings import ApiKeyAuth, Auth, BasicAuth, BearerAuth, OAuth2Auth, SourceConfig

__all__ = ["Credentials"]

log = get_logger("auth")

#: Lifetime assumed for a token whose response gives no ``expires_in``.
_DEFAULT_LIFETIME_S = 3600.0
#: Longest wait for the token endpoint.
_TOKEN_TIMEOUT_S = 30.0


class _TokenReply(msgspec.Struct, frozen=True):
    access_token: str
    expires_in: float | None = None
    token_type: str = "Bearer"


class _TokenError(msgspec.Struct, frozen=True):
    error: str | None = None
    error_description: str | None = None


_decode_token = msgspec.json.Decoder(_TokenReply).decode
_decode_token_error = msgspec.json.Decoder(_TokenError).decode


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    #: Monotonic time after which it is fetched again.
    refresh_at: float


class _HeaderAuth(httpx.Auth):
    def __init__(self, name: str, value: str) -> None:
        self._name = name
        self._value = value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self._name] = self._value
        yield request


class _ParamAuth(httpx.Auth):
    def __init__(self, name: str, value: str) -> None:
        self._name = name
        self._value = value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.url = request.url.copy_merge_params({self._name: self._value})
        yield request


class _OAuth2Flow(httpx.Auth):
    def __init__(self, credentials: Credentials, source: str, config: OAuth2Auth) -> None:
        self._credentials = credentials
        self._source = source
        self._config = config

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._credentials.token(self._source, self._config)
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code == 401:
            log.info("auth.token_rejected", extra={"source": self._source})
            token = await self._credentials.token(self._source, self._config, stale=token)
            request.headers["Authorization"] = f"Bearer {token.value}"
            yield request


class Credentials:
    """Per-process credentials: an ``httpx.Auth`` per source, and the OAuth token cache."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self._tokens: dict[tuple[str, OAuth2Auth], _Token] = {}
        self._locks: dict[tuple[str, OAuth2Auth], anyio.Lock] = {}
        #: Token requests sent, for tests and status.
        self.token_requests = 0

    def for_source(self, source: SourceConfig) -> httpx.Auth | None:
        """The auth flow for ``source``'s requests; None when it has no ``auth``."""
        return self.for_config(source.name, source.auth)

    def for_config(self, source: str, auth: Auth | None) -> httpx.Auth | None:
        if auth is None:
            return None
        if isinstance(auth, BearerAuth):
            return _HeaderAuth("Authorization", f"Bearer {auth.token}")
        if isinstance(auth, ApiKeyAuth):
            if auth.header is not None:
                return _HeaderAuth(auth.header, auth.key)
            assert auth.param is not None  # settings require exactly one of header and param
            return _ParamAuth(auth.param, auth.key)
        if isinstance(auth, BasicAuth):
            return httpx.BasicAuth(auth.username, auth.password)
        return _OAuth2Flow(self, source, auth)

    async def token(
        self, source: str, config: OAuth2Auth, *, stale: _Token | None = None
    ) -> _Token:
        """A valid token for ``source``: cached, or fetched (again, when ``stale`` was refused)."""
        key = (source, config)
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            # A token another run fetched after ``stale`` was refused is as good as new.
            if cached is not None and cached != stale and anyio.current_time() < cached.refresh_at:
                return cached
            token = await self._fetch_token(source, config)
            self._tokens[key] = token
            return token

    async def _fetch_token(self, source: str, config: OAuth2Auth) -> _Token:
        url = redact_url(config.token_url)
        form = {"grant_type": "client_credentials"}
        if config.scope:
            form["scope"] = config.scope
        if config.audience:
            form["audience"] = config.audience
        auth: httpx.Auth | None = None
        if config.client_auth == "basic":
            auth = httpx.BasicAuth(config.client_id, config.client_secret)
        else:
            form |= {"client_id": config.client_id, "client_secret": config.client_secret}
        self.token_requests += 1
        started = anyio.current_time()
        try:
            request = self._http.build_request(
                "POST",
                config.token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=_TOKEN_TIMEOUT_S,
            )
            response = await self._http.send(request, auth=auth)
        except httpx.TimeoutException as exc:
            raise FetchTransient(
                f"OAuth token request to {url} timed out", source=source, url=url, code="auth"
            ) from exc
        except httpx.HTTPError as exc:
            raise FetchTransient(
                f"OAuth token request to {url} failed: {type(exc).__name__}",
                source=source,
                url=url,
                code="auth",
            ) from exc
        status = response.status_code
        if not 200 <= status <= 299:
            message = (
                f"OAuth token request to {url}: HTTP {status}{_error_detail(response, config)}"
            )
            raise status_error(message, response, source=source, url=url, code="auth")
        try:
            reply = _decode_token(response.content)
        except (msgspec.ValidationError, msgspec.DecodeError):
            raise FetchPermanent(
                f"OAuth token request to {url}: the reply has no access_token",
                source=source,
                url=url,
                status=status,
                code="auth",
            ) from None
        lifetime = reply.expires_in if reply.expires_in and reply.expires_in > 0 else None
        lifetime = lifetime or _DEFAULT_LIFETIME_S
        margin = min(config.refresh_margin_s, lifetime / 2)
        log.info(
            "auth.token_fetched",
            extra={"source": source, "expires_in_s": lifetime, "url": url},
        )
        return _Token(value=reply.access_token, refresh_at=started + lifetime - margin)


def _error_detail(response: httpx.Response, config: OAuth2Auth) -> str:
    """The endpoint's ``error`` and ``error_description`` (RFC 6749 §5.2), nothing else."""
    try:
        error = _decode_token_error(response.content)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return ""
    parts = [part for part in (error.error, error.error_description) if part]
    # An endpoint that echoes what it was sent must not put the secret into a run's error.
    text = redact_text(": ".join(parts)).replace(config.client_secret, "REDACTED")
    return f": {text[:200]}" if parts else ""
