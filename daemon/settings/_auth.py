"""``[sources.auth]``: the credentials a source's requests carry, and secret-valued headers.

Secret fields (token, key, password, client_secret) come only from ``{ secret = "…" }``
references, resolved at load (``_secrets``); ``repr`` never shows them. A header or parameter
value resolved from a reference is a ``SecretValue``, so the fetcher knows to send it only to
the source's origins, like the auth.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

import msgspec

from daemon.settings._units import SECONDS, field_check
from daemon.template import check_url

__all__ = [
    "AUTH_SECRET_FIELDS",
    "ApiKeyAuth",
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "OAuth2Auth",
    "SecretValue",
]


class _AuthBase(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    """``[sources.auth]``: credentials applied to every request of the source.

    Secret fields (token, key, password, client_secret) come only from ``{ secret = "…" }``
    references, resolved at load; ``repr`` never shows them.
    """

    _SECRETS: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={'<secret>' if name in self._SECRETS else getattr(self, name)!r}"
            for name in self.__struct_fields__
        )
        return f"{type(self).__name__}({shown})"


class BearerAuth(_AuthBase, frozen=True, tag="bearer"):
    """``Authorization: Bearer <token>``."""

    _SECRETS = ("token",)
    token: str


class ApiKeyAuth(_AuthBase, frozen=True, tag="api_key"):
    """A key in a request header (``header = "X-Api-Key"``) or query parameter (``param``)."""

    _SECRETS = ("key",)
    key: str
    header: str | None = None
    param: str | None = None

    def __post_init__(self) -> None:
        if (self.header is None) == (self.param is None):
            raise ValueError("header: give exactly one of header or param for an api_key")


class BasicAuth(_AuthBase, frozen=True, tag="basic"):
    """HTTP Basic authentication."""

    _SECRETS = ("password",)
    username: str
    password: str


class OAuth2Auth(_AuthBase, frozen=True, tag="oauth2"):
    """OAuth 2 client credentials: a token from ``token_url``, cached, refreshed before expiry."""

    _SECRETS = ("client_secret",)
    token_url: str
    client_id: str
    client_secret: str
    scope: str | None = None
    audience: str | None = None
    #: How the client authenticates to the token endpoint: HTTP Basic (RFC 6749) or form fields.
    client_auth: Literal["basic", "body"] = "basic"
    #: Fetch a new token this long before the old one expires (at most half its lifetime).
    refresh_margin_s: Annotated[float, msgspec.Meta(ge=0)] = 60 * SECONDS

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.token_url):
            raise ValueError(f"token_url: {self.token_url!r} must start with http:// or https://")
        field_check("token_url", check_url, self.token_url)


class SecretValue(str):
    """A header or parameter value that came from ``{ secret = "…" }``: a credential, which
    the fetcher sends only to the source's origins. A parameter's is escaped as a template
    (``{{``, ``}}``), like every parameter value."""

    __slots__ = ()


Auth = BearerAuth | ApiKeyAuth | BasicAuth | OAuth2Auth
#: Fields of ``[sources.auth]`` that must be ``{ secret = "…" }`` references, never literals.
AUTH_SECRET_FIELDS = ("token", "key", "password", "client_secret")
