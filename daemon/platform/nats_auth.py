"""NATS authentication and TLS, read as the nats CLI reads them: one place for daemon and CLI.

Each setting is a natscli variable or a config key; the variable wins, as ``NATS_URL`` does::

    NATS_USER, NATS_PASSWORD   nats_user, nats_password = { secret = "…" }
    NATS_CREDS                 nats_creds   a .creds file (user JWT and seed): decentralized auth
    NATS_NKEY                  nats_nkey    an NKey seed file
    NATS_CA                    nats_ca      the CA that signed the server's certificate
    NATS_CERT, NATS_KEY        nats_cert, nats_key   a client certificate: mutual TLS

TLS is required, never merely tried, when a server URL is ``tls://`` or a CA or client
certificate is set (natscli does the same). nats-py upgrades to TLS only when the server's INFO
asks for it, so a server (or a man in the middle) that does not would receive the credentials
in plain text: ``AuthClient`` refuses that INFO before anything is sent.

A server that answers but refuses us (an authorization violation, a certificate that does not
verify, no TLS) will refuse the same credentials again: ``connect`` stops at the first such
refusal with one clear line (``refusal``) instead of retrying until its caller's timeout.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import nats.errors
from nats.aio.client import Client

from daemon.errors import BusUnavailable, ConfigError

__all__ = [
    "AuthClient",
    "NatsAuth",
    "TlsNotOffered",
    "close",
    "connect",
    "refusal",
    "servers_of",
    "shown_url",
]


class TlsNotOffered(nats.errors.Error):
    """The server did not ask for TLS although we require it: nothing was sent to it."""

    def __str__(self) -> str:
        return "nats: the server does not offer TLS"


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """Who we are to NATS and whom we trust; empty: no credentials, system CAs for tls://."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    creds: str | None = None
    nkey: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def tls_required_by(self, servers: Iterable[str]) -> str | None:
        """What makes TLS compulsory (for messages), or None."""
        if any(server.lower().startswith("tls://") for server in servers):
            return "the tls:// URL"
        if self.ca is not None:
            return "nats_ca (NATS_CA)"
        if self.cert is not None:
            return "nats_cert (NATS_CERT)"
        return None

    def who(self) -> str:
        """The identity we present, for messages (never the password or seed)."""
        if self.creds is not None:
            return f"the credentials in {self.creds}"
        if self.nkey is not None:
            return f"the NKey in {self.nkey}"
        if self.user is not None:
            return f"user {self.user!r}"
        if self.cert is not None:
            return f"the client certificate {self.cert}"
        return "a client without credentials (set NATS_USER/NATS_PASSWORD, NATS_CREDS or NATS_NKEY)"

    def connect_options(self, servers: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments for nats-py's ``connect``; ConfigError naming the key of a file
        that cannot be read or is not what it should be (checked here, not mid-connect)."""
        options: dict[str, Any] = {}
        if self.user is not None:
            options["user"] = self.user
            options["password"] = self.password or ""
        if self.creds is not None:
            text = _read("nats_creds (NATS_CREDS)", self.creds)
            if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
                raise ConfigError(
                    f"nats_creds (NATS_CREDS): {self.creds} is not a .creds file"
                    " (a user JWT and an NKey seed, as nsc generates)"
                )
            options["user_credentials"] = self.creds
        if self.nkey is not None:
            seed = _read("nats_nkey (NATS_NKEY)", self.nkey)
            _check_seed(self.nkey, seed)
            options["nkeys_seed"] = self.nkey
        if self.tls_required_by(servers) is not None:
            options["tls"] = self.tls_context()
        return options

    def tls_context(self) -> ssl.SSLContext:
        """Verifies the server (system CAs, or only ``ca``); presents ``cert`` when set."""
        try:
            context = ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"nats_ca (NATS_CA): cannot use {self.ca}: {_why(exc)}") from None
        if self.cert is not None:
            try:
                context.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"nats_cert/nats_key (NATS_CERT/NATS_KEY): cannot use {self.cert}"
                    f" with {self.key}: {_why(exc)}"
                ) from None
        return context


def _read(key: str, path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {_why(exc)}") from None


def _check_seed(path: str, seed: str) -> None:
    import nkeys  # nats-py's optional dependency for NKeys; ours is not optional

    try:
        nkeys.from_seed(bytearray(seed.strip().encode()))
    except Exception:  # nkeys raises its own error types, and binascii's, for a bad seed
        raise ConfigError(
            f"nats_nkey (NATS_NKEY): {path} is not an NKey seed (one line starting with 'SU')"
        ) from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def servers_of(url: str) -> list[str]:
    """A cluster's seed servers: ``nats://a:4222,nats://b:4222``."""
    return [server.strip() for server in url.split(",") if server.strip()]


def shown_url(url: str) -> str:
    """``url`` with any password in it masked, for messages."""
    shown = []
    for server in servers_of(url):
        parts = urlsplit(server)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            server = parts._replace(netloc=f"{parts.username}:***@{host}").geturl()
        shown.append(server)
    return ",".join(shown)


#: After a refusal, how long nats-py may take to close the refused connection (it waits for
#: ever after a failed TLS handshake) before the attempt is given up.
_SETTLE_S = 0.5
#: Longest wait for nats-py to close a client that did not connect.
_CLOSE_S = 2.0


class AuthClient(Client):
    """nats-py's client bound to one URL and ``NatsAuth``: it refuses a server that does not
    ask for TLS where TLS is required, and ``connect`` stops at the first refusal."""

    def __init__(self, url: str, auth: NatsAuth) -> None:
        super().__init__()
        self.url = url
        self.auth = auth
        self.seeds = servers_of(url)
        self._tls_required_by = auth.tls_required_by(self.seeds)
        #: Checked here, so an unreadable file is a ConfigError before any connection.
        self.credentials = auth.connect_options(self.seeds)

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        # Called with the server's first INFO, before the TLS upgrade and before CONNECT.
        if initial_connection and self._tls_required_by and not info.get("tls_required"):
            raise TlsNotOffered
        await super()._process_info(info, initial_connection)


async def connect(
    nc: AuthClient, on_error: Callable[[Exception], Awaitable[None]], **options: Any
) -> None:
    """``nc.connect`` with its credentials, stopping at the first refusal.

    ``BusUnavailable`` (code ``bus_refused``) with ``refusal``'s line when a server refuses
    us: nats-py itself would try again, or hang (after a certificate that does not verify, it
    never returns from the attempt). Every error still reaches ``on_error``.
    """
    refused: str | None = None
    try:
        with anyio.CancelScope() as attempt:

            async def error_cb(exc: Exception) -> None:
                nonlocal refused
                await on_error(exc)
                if refused is None and (refused := refusal(nc.url, nc.auth, exc)) is not None:
                    # Not at once: nats-py closes the refused connection after this callback.
                    attempt.deadline = min(attempt.deadline, anyio.current_time() + _SETTLE_S)

            await nc.connect(nc.seeds, error_cb=error_cb, **options, **nc.credentials)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        if refused is not None:  # nats-py gave up on its own within the settling time
            raise BusUnavailable(refused, code="bus_refused") from exc
        raise
    if attempt.cancelled_caught:
        raise BusUnavailable(refused or "refused", code="bus_refused")


async def close(nc: Client) -> None:
    """Close a client that did not connect, shielded from cancellation but bounded: after a
    TLS handshake that failed or was cancelled, nats-py waits for ever for its transport."""
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + _CLOSE_S
        await nc.close()


def refusal(url: str, auth: NatsAuth, exc: BaseException) -> str | None:
    """One line naming the server and why it refused us, if ``exc`` is a refusal that
    retrying cannot fix; None for anything else (a server down, a timeout)."""
    shown = shown_url(url)
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text:
        return f"NATS at {shown} refused {auth.who()}: authorization violation"
    if "authentication expired" in text or "authentication revoked" in text:
        return f"NATS at {shown} refused {auth.who()}: {str(exc).removeprefix('nats: ')}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        trusted = f"the CA in {auth.ca}" if auth.ca else "the system's CAs"
        detail = exc.verify_message or "certificate verify failed"
        # No colon right after the URL: the log's URL redactor would take it for a port.
        return (
            f"NATS at {shown} has a certificate that does not verify (certificate verify"
            f" failed: {detail}; trusting {trusted})"
        )
    if isinstance(exc, ssl.SSLError) and "certificate_required" in text:
        return (
            f"NATS at {shown} requires a client certificate (mutual TLS): set nats_cert"
            " and nats_key (NATS_CERT, NATS_KEY)"
        )
    if isinstance(exc, ssl.SSLError) and (
        "UNKNOWN_CA" in text.upper() or "BAD_CERT" in text.upper()
    ):
        return f"NATS at {shown} refused the client certificate {auth.cert}: {exc.reason}"
    if isinstance(exc, TlsNotOffered):
        required = auth.tls_required_by(servers_of(url)) or "the configuration"
        return f"NATS at {shown} does not offer TLS, which {required} requires"
    return None
