"""``[sources.auth]`` as credentials on the wire, and OAuth tokens cached.

``Credentials`` (one per fetcher, so per process) turns a source's auth config into the
``httpx.Auth`` applied when the request is sent (``_send.send(..., auth=…)``), confined to the
source's origins (``_scope``):

* ``bearer``  — ``Authorization: Bearer <token>``;
* ``api_key`` — the key in a header, or in a query parameter;
* ``basic``   — HTTP Basic;
* ``oauth2``  — client credentials: a token from ``token_url`` (fetched with the shared
  client), cached per source, fetched again ``refresh_margin_s`` (at most half its lifetime)
  before it expires, and fetched again once when the API answers 401 (revoked or expired
  early). One token request at a time per source: concurrent runs share the result.

Applied at send time, the credentials never appear in the URL or headers coleta records.
The token request goes through ``_send.send`` like any other: its body read up to
``_TOKEN_MAX_BYTES``, every failure classified by ``errors.from_httpx`` (a connection error,
timeout, 429 or 5xx is a ``FetchTransient``; a redirect loop, a bad encoding, any other
answer a ``FetchPermanent``), then given code ``auth``. Its message carries the redacted token
URL, the status and the endpoint's ``error`` / ``error_description`` — never the request's
credentials or a token.
"""

from __future__ import annotations

import anyio
import httpx
import msgspec

from daemon.errors import FetchPermanent, FetchTransient, from_httpx
from daemon.fetcher._scope import ORIGIN, OAuthGrant, Scope, Token, basic, origin_of
from daemon.fetcher._send import send
from daemon.platform.logs import get_logger
from daemon.platform.redact import redact_text, redact_url, remember
from daemon.settings import (
    ApiKeyAuth,
    Auth,
    BasicAuth,
    BearerAuth,
    OAuth2Auth,
    SecretValue,
    SourceConfig,
)

__all__ = ["Credentials"]

log = get_logger("auth")

#: Lifetime assumed for a token whose response gives no ``expires_in``.
_DEFAULT_LIFETIME_S = 3600.0
#: Longest wait for the token endpoint.
_TOKEN_TIMEOUT_S = 30.0
#: Most of a token endpoint's answer ever read (a JWT is a few KiB).
_TOKEN_MAX_BYTES = 256 * 1024


class TokenReply(msgspec.Struct, frozen=True):
    access_token: str
    expires_in: float | None = None
    token_type: str = "Bearer"


class TokenError(msgspec.Struct, frozen=True):
    error: str | None = None
    error_description: str | None = None


_decode_token = msgspec.json.Decoder(TokenReply).decode
_decode_token_error = msgspec.json.Decoder(TokenError).decode


def _literal(template: str) -> str:
    """A secret parameter's value: ``resolve_secrets`` doubled its braces (a template)."""
    return template.replace("{{", "{").replace("}}", "}")


class Credentials:
    """Per-process credentials: an ``httpx.Auth`` per source, and the OAuth token cache."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self._tokens: dict[tuple[str, OAuth2Auth], Token] = {}
        self._locks: dict[tuple[str, OAuth2Auth], anyio.Lock] = {}

    def for_source(self, source: SourceConfig) -> httpx.Auth:
        """The scope of ``source``'s requests: its auth, secret headers and parameters, sent
        only to the origin of its URL and ``auth_origins``."""
        secret_headers: dict[str, str] = {
            k: v for k, v in source.headers.items() if isinstance(v, SecretValue)
        }
        secret_params = {
            k: _literal(v) for k, v in source.params.items() if isinstance(v, SecretValue)
        }
        origins = frozenset(origin_of(httpx.URL(origin)) for origin in source.auth_origins)
        return self._scope(source.name, source.auth, secret_headers, secret_params, origins)

    def for_config(self, source: str, auth: Auth | None) -> httpx.Auth | None:
        """``auth`` alone, for the origin each request is sent to; None when there is none."""
        return None if auth is None else self._scope(source, auth, {}, {}, frozenset())

    def _scope(
        self,
        source: str,
        auth: Auth | None,
        headers: dict[str, str],
        params: dict[str, str],
        origins: frozenset[str],
    ) -> Scope:
        oauth = None
        secrets = {*headers.values(), *params.values()}
        if isinstance(auth, BearerAuth):
            headers["Authorization"] = f"Bearer {auth.token}"
            secrets.add(auth.token)
        elif isinstance(auth, ApiKeyAuth):
            if auth.header is not None:
                headers[auth.header] = auth.key
            else:
                assert auth.param is not None  # settings require exactly one of header and param
                params[auth.param] = auth.key
            secrets.add(auth.key)
        elif isinstance(auth, BasicAuth):
            headers["Authorization"] = basic(auth.username, auth.password)
            secrets.add(auth.password)
        elif isinstance(auth, OAuth2Auth):
            oauth = OAuthGrant(self, source, auth)
        return Scope(
            headers=headers,
            params=params,
            secrets=frozenset(secrets),
            origins=origins,
            oauth=oauth,
            userinfo=auth is None,
        )

    async def token(self, source: str, config: OAuth2Auth, *, stale: Token | None = None) -> Token:
        """A valid token for ``source``: cached, or fetched (again, when ``stale`` was refused)."""
        key = (source, config)
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            # A token another run fetched after ``stale`` was refused is as good as new.
            if cached is not None and cached != stale and anyio.current_time() < cached.refresh_at:
                return cached
            token = await self._fetch_token(source, config)
            remember((id(self), source), token.value)  # masked everywhere, instead of the old
            self._tokens[key] = token
            return token

    async def _fetch_token(self, source: str, config: OAuth2Auth) -> Token:
        url = redact_url(config.token_url)
        form = {"grant_type": "client_credentials"}
        if config.scope:
            form["scope"] = config.scope
        if config.audience:
            form["audience"] = config.audience
        headers = {}
        if config.client_auth == "basic":
            headers["Authorization"] = basic(config.client_id, config.client_secret)
        else:
            form |= {"client_id": config.client_id, "client_secret": config.client_secret}
        # The client's credentials belong to the token endpoint's origin: a redirect elsewhere
        # fails the request rather than carry them, or the form with the secret, along.
        auth = Scope(headers=headers, userinfo=config.client_auth == "body", confined=True)
        started = anyio.current_time()

        def refusal(response: httpx.Response, body: bytes) -> str:
            return f"HTTP {response.status_code}{_error_detail(body, config)}"

        try:
            request = self._http.build_request(
                "POST",
                config.token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=_TOKEN_TIMEOUT_S,
                extensions={ORIGIN: origin_of(httpx.URL(config.token_url))},
            )
            fetched = await send(
                self._http,
                request,
                source=source,
                max_bytes=_TOKEN_MAX_BYTES,
                auth=auth,
                spool_over=_TOKEN_MAX_BYTES,  # in memory, always
                refusal=refusal,
            )
        except httpx.InvalidURL as exc:  # build_request; settings refuse such a token_url
            raise _token_error(from_httpx(exc, source=source, url=url), url) from exc
        except (FetchTransient, FetchPermanent) as exc:
            raise _token_error(exc, url) from exc
        try:
            reply = _decode_token(fetched.body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            raise FetchPermanent(
                f"OAuth token request to {url}: the reply has no access_token",
                source=source,
                url=url,
                status=fetched.status_code,
                code="auth",
            ) from None
        lifetime = reply.expires_in if reply.expires_in and reply.expires_in > 0 else None
        lifetime = lifetime or _DEFAULT_LIFETIME_S
        margin = min(config.refresh_margin_s, lifetime / 2)
        log.info(
            "auth.token_fetched",
            extra={"source": source, "expires_in_s": lifetime, "url": url},
        )
        return Token(value=reply.access_token, refresh_at=started + lifetime - margin)


def _token_error(exc: FetchTransient | FetchPermanent, url: str) -> FetchTransient | FetchPermanent:
    """``exc``, which ``send`` raised for the token request, as the token endpoint's failure:
    the same branch, status and ``Retry-After``; code ``auth``; a message saying so (the
    endpoint's answer says nothing of its URL, other failures do)."""
    if exc.code == "http_status":
        message = f"OAuth token request to {url}: {exc}"
    else:
        message = f"OAuth token request failed: {exc}"
    if isinstance(exc, FetchTransient):
        return FetchTransient(
            message,
            source=exc.source,
            url=url,
            status=exc.status,
            code="auth",
            retry_after_s=exc.retry_after_s,
        )
    return FetchPermanent(message, source=exc.source, url=url, status=exc.status, code="auth")


def _error_detail(body: bytes, config: OAuth2Auth) -> str:
    """The endpoint's ``error`` and ``error_description`` (RFC 6749 §5.2), nothing else."""
    try:
        error = _decode_token_error(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return ""
    parts = [part for part in (error.error, error.error_description) if part]
    # An endpoint that echoes what it was sent must not put the secret into a run's error.
    text = redact_text(": ".join(parts)).replace(config.client_secret, "REDACTED")
    return f": {text[:200]}" if parts else ""
