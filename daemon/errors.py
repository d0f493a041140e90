"""The one exception tree of coleta, and the one place where library exceptions are classified.

Every failure a stage can meet is classified once, here, into one of three branches; the
service's refusals make a fourth, answered rather than retried::

    ColetaError
    ├── FatalError             the daemon cannot run at all: it exits with a documented code
    │   ├── ConfigError        bad configuration: names the key path and the value (exit 2)
    │   └── EmbeddedServerError  an embedded nats-server or PostgreSQL cannot start (exit 3)
    ├── TransientError         may go away: retried with backoff, bounded (retry policy,
    │   │                      max_deliver), never forever
    │   ├── FetchTransient     connection error, timeout, HTTP 429 or 5xx
    │   ├── StoreUnavailable   PostgreSQL unreachable, restarting or out of resources
    │   └── BusUnavailable     NATS or JetStream did not take or give a message in time
    ├── PermanentError         retrying cannot help: the run ends ``failed`` with ``code``, and
    │   │                      the message goes to the dead-letter stream intact
    │   ├── FetchPermanent     other 4xx; a redirect, URL or body coleta cannot follow or read
    │   ├── PaginationError    the API's paging cannot be followed (a cursor that repeats)
    │   ├── PoisonMessage      a bus message that is not a valid contract (any size, depth,
    │   │                      encoding or type)
    │   ├── StoreRejected      PostgreSQL refuses the data itself (a value, a size, a limit)
    │   └── InternalError      anything unclassified: a bug, permanent for that one message
    └── ServiceFailure         a request the service cannot answer: an error reply whose
                               ``code`` is stable (``bad_request`` 400 … ``internal`` 500)

Third-party exceptions are translated at the boundary with ``raise mapped from exc``:
``from_httpx``, ``from_nats`` and ``from_psycopg`` are the only mappings (``nats_errors`` and
``psycopg_errors`` apply them around a call), and ``classify`` turns *any* exception into a
branch, so a handler decides from the branch alone and nothing raised from a handler can stop a
stage. Errors carry fields (source, url, status) as well as text; ``code`` is the stable
machine-readable reason stored with a failed run and used as the dead-letter subject's last
token.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import msgspec
import nats.errors

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "EXIT_CONFIG",
    "EXIT_UNREACHABLE",
    "BusUnavailable",
    "ColetaError",
    "ConfigError",
    "EmbeddedServerError",
    "FatalError",
    "FetchPermanent",
    "FetchTransient",
    "InternalError",
    "PaginationError",
    "PermanentError",
    "PoisonMessage",
    "RedirectRefused",
    "ServiceFailure",
    "StoreRejected",
    "StoreUnavailable",
    "TransientError",
    "classify",
    "first_line",
    "from_httpx",
    "from_nats",
    "from_psycopg",
    "nats_errors",
    "psycopg_errors",
]

#: Exit code of a daemon whose configuration is invalid (``FatalError``).
EXIT_CONFIG = 2
#: Exit code of a daemon (or CLI) that cannot reach or authenticate to its NATS or PostgreSQL.
EXIT_UNREACHABLE = 3


class ColetaError(Exception):
    """Base of every error coleta raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code

    def __str__(self) -> str:
        return self.message


# -- fatal ------------------------------------------------------------------------------------


class FatalError(ColetaError):
    """The daemon cannot run: it logs why and exits with ``exit_code``."""

    code = "fatal"
    exit_code = EXIT_CONFIG


class ConfigError(FatalError):
    """The configuration is invalid; the message names the key path and the bad value."""

    code = "config"


class EmbeddedServerError(FatalError):
    """An embedded server could not start or stop; ``log`` says where to look."""

    code = "embedded_server"
    exit_code = EXIT_UNREACHABLE

    def __init__(self, message: str, *, server: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.server, self.log = server, log


# -- transient --------------------------------------------------------------------------------


class TransientError(ColetaError):
    """A failure that may go away: the message is handed back and retried later."""

    code = "transient"


class _FetchMixin:
    def _set_fetch_fields(self, source: str, url: str, status: int | None) -> None:
        self.source, self.url, self.status = source, url, status


class FetchTransient(TransientError, _FetchMixin):
    """Connection error, timeout, 429 or 5xx from the source's API."""

    def __init__(
        self,
        message: str,
        *,
        source: str,
        url: str,
        status: int | None = None,
        code: str = "http_transient",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self._set_fetch_fields(source, url, status)
        self.retry_after_s = retry_after_s


class StoreUnavailable(TransientError):
    """PostgreSQL cannot be reached, is restarting, or is short of resources."""

    code = "store_unavailable"


class BusUnavailable(TransientError):
    """NATS or JetStream did not accept or deliver a message (reconnecting, no stream, slow)."""

    code = "bus_unavailable"


# -- permanent --------------------------------------------------------------------------------


class PermanentError(ColetaError):
    """Retrying cannot fix it: the run is recorded as failed, the message dead-lettered."""

    code = "permanent"


class FetchPermanent(PermanentError, _FetchMixin):
    """Any other 4xx, or a response coleta refuses (too large, undecodable, a bad redirect)."""

    def __init__(
        self, message: str, *, source: str, url: str, status: int | None = None, code: str
    ) -> None:
        super().__init__(message, code=code)
        self._set_fetch_fields(source, url, status)


class PaginationError(PermanentError):
    """The API's paging cannot be followed: a repeating cursor or URL (``pagination_loop``),
    or pages with nothing to stop a walk on (``pagination_no_records``)."""

    code = "pagination_loop"


class PoisonMessage(PermanentError):
    """A bus message that fails contract validation: never retried."""

    code = "poison"

    def __init__(self, message: str, *, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


class StoreRejected(PermanentError):
    """PostgreSQL refuses the data itself: retrying the same rows gives the same answer."""

    code = "store_rejected"

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class InternalError(PermanentError):
    """An exception nobody classified: a bug. Permanent for the one message it happened on."""

    code = "internal"


# -- answered ---------------------------------------------------------------------------------


class ServiceFailure(ColetaError):
    """A request the service cannot answer: an error reply with a stable code and status."""

    STATUS = dict(
        bad_request="400", unknown_source="404", too_large="413", unavailable="503", internal="500"
    )

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)

    @property
    def status(self) -> str:
        """The reply's micro ``Nats-Service-Error-Code``."""
        return self.STATUS.get(self.code, "500")


# -- classification ---------------------------------------------------------------------------


def classify(exc: BaseException) -> ColetaError:
    """The branch of any exception a handler can meet (never cancellation); never raises.

    An exception group is classified by its most retryable member (a group holding a
    transient failure is retried: the permanent one will show again if it is real).
    """
    if isinstance(exc, ColetaError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [classify(inner) for inner in exc.exceptions]
        transient = [leaf for leaf in leaves if isinstance(leaf, TransientError)]
        return (transient or leaves or [InternalError(_text(exc))])[0]
    if isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
        return from_httpx(exc, source="", url="")
    if isinstance(exc, nats.errors.Error):
        return from_nats(exc, "NATS")
    # psycopg is imported by the code that talks to PostgreSQL, not by the CLI's commands (a
    # seventh of each one's start): until it is, no exception can be one of its.
    pg = sys.modules.get("psycopg")
    if pg is not None and isinstance(exc, pg.Error):
        return from_psycopg(exc)
    if isinstance(exc, RecursionError):
        return PermanentError(f"nested too deeply to process ({_text(exc)})", code="too_deep")
    if isinstance(exc, MemoryError):
        return PermanentError("too large to hold in memory", code="too_large")
    if isinstance(exc, msgspec.DecodeError | msgspec.ValidationError | UnicodeError):
        return PermanentError(_text(exc), code="invalid")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return TransientError(f"timed out ({_text(exc)})", code="timeout")
    if isinstance(exc, OSError):
        # A temporary file that could not be written (disk full), a socket reset: may pass.
        return TransientError(_text(exc), code="os_error")
    return InternalError(f"{type(exc).__name__}: {_text(exc)}")


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def _text(exc: BaseException) -> str:  # in a message: one line, bounded
    return first_line(exc)[:500]


# -- httpx ------------------------------------------------------------------------------------


class RedirectRefused(httpx.UnsupportedProtocol):
    """A redirect coleta cannot follow, refused before httpx does (``bad_redirect``); ``shown``
    is the location as a message may show it (redacted by whoever raised it)."""

    def __init__(self, location: str, reason: str, *, request: httpx.Request, shown: str) -> None:
        super().__init__(f"a redirect to a URL coleta cannot request: {reason}", request=request)
        self.location, self.reason, self.shown = location, reason, shown


def from_httpx(
    exc: httpx.HTTPError | httpx.InvalidURL | UnicodeError,
    *,
    source: str,
    url: str,
    elapsed_s: float = 0.0,
) -> FetchTransient | FetchPermanent:
    """The fetch error for what sending or building a request raised: transient only where
    waiting can help.

    ``url`` must already be redacted. Messages never repeat httpx's own text where it can
    carry the request URL (with a key in its query string), nor a ``UnicodeError``'s, which
    quotes the character (maybe one of a secret's).
    """
    name = type(exc).__name__
    if isinstance(exc, UnicodeError):  # a header or URL httpx cannot encode (it does not wrap)
        message = f"a header or the URL holds what it cannot carry ({name})"
        exc = httpx.LocalProtocolError(message)
    if isinstance(exc, RedirectRefused):
        message = f"{url} redirects to {exc.shown!r}, which coleta cannot request: {exc.reason}"
        return FetchPermanent(message, source=source, url=url, code="bad_redirect")
    if isinstance(exc, httpx.TimeoutException):
        took = f" after {elapsed_s:.1f} s" if elapsed_s else ""
        return FetchTransient(f"{name}{took} from {url}", source=source, url=url, code="timeout")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        message = f"invalid URL {url}: {_text(exc)}"
        return FetchPermanent(message, source=source, url=url, code="bad_url")
    if isinstance(exc, httpx.LocalProtocolError):
        message = f"coleta cannot send this request to {url}: {_text(exc)}"
        return FetchPermanent(message, source=source, url=url, code="bad_request")
    if isinstance(exc, httpx.TransportError):
        # Refused, reset, DNS, TLS, a malformed answer: the server or the network may recover.
        message = f"{name} for {url}: {_text(exc)}"
        return FetchTransient(message, source=source, url=url, code="connect")
    if isinstance(exc, httpx.TooManyRedirects):
        message = f"too many redirects from {url}"
        return FetchPermanent(message, source=source, url=url, code="too_many_redirects")
    if isinstance(exc, httpx.DecodingError):
        message = f"the body from {url} does not match its Content-Encoding: {_text(exc)}"
        return FetchPermanent(message, source=source, url=url, code="bad_encoding")
    message = f"{name} for {url}: {_text(exc)}"
    return FetchPermanent(message, source=source, url=url, code="http_error")


# -- nats -------------------------------------------------------------------------------------


def from_nats(exc: BaseException, what: str) -> BusUnavailable | PermanentError:
    """The error for a nats-py exception met while doing ``what`` ("publish to …").

    Only a message larger than the server takes is permanent: every other refusal (no
    stream, no responders, a timeout, a closed or reconnecting connection, a JetStream API
    error) is the bus being unavailable for now; ``code`` tells ``no_responders`` and
    ``timeout`` (a request nobody answered) from the rest.
    """
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PermanentError(f"{what}: the message is larger than NATS takes", code="too_large")
    code = "timeout" if isinstance(exc, TimeoutError) else None
    code = "no_responders" if isinstance(exc, nats.errors.NoRespondersError) else code
    return BusUnavailable(f"{what} failed: {str(exc).strip() or type(exc).__name__}", code=code)


@contextlib.contextmanager
def nats_errors(what: str) -> Iterator[None]:
    """Around a nats-py call: what it raises (a bare ``TimeoutError`` too) is ``from_nats``'s."""
    try:
        yield
    except (nats.errors.Error, TimeoutError) as exc:
        raise from_nats(exc, what) from exc


# -- psycopg ----------------------------------------------------------------------------------

#: SQLSTATE classes and codes after which the same statement may well succeed later: the
#: connection or server (08, 57P, 58), resources (53), concurrency (40, 55P03, 57014), and a
#: database that cannot take writes as it stands — read-only after a failover (25006), the
#: role's rights or the schema missing (42501, 3F000, 42P01, 3D000, class 28). None of these
#: is the data's fault: dead-lettering would only move the problem.
_OF_SERVER: tuple[str, ...] = ("08", "53", "57P", "58", "40", "55P03", "57014", "25006")
_RETRYABLE_CLASSES = (*_OF_SERVER, "42501", "3F000", "42P01", "3D000", "28")


def from_psycopg(exc: psycopg.Error) -> StoreUnavailable | StoreRejected:
    """PostgreSQL unavailable (retry later) or refusing the data (a permanent answer).

    By SQLSTATE, not by exception class: ``psycopg.OperationalError`` covers a lost
    connection (class 08, or no SQLSTATE at all; a pool with no connection to give) but also
    answers about the data itself, such as an index row too large (54000), which no retry
    can fix.
    """
    import psycopg  # loaded already: exc is one of its errors

    sqlstate = exc.sqlstate
    detail = _text(exc)
    if sqlstate is None:
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return StoreUnavailable(detail)  # client side: no connection, connection lost
        return StoreRejected(detail)  # client side: a value psycopg cannot send
    if sqlstate.startswith(_RETRYABLE_CLASSES):
        return StoreUnavailable(f"{detail} (SQLSTATE {sqlstate})")
    return StoreRejected(f"{detail} (SQLSTATE {sqlstate})", sqlstate=sqlstate)


@contextlib.contextmanager
def psycopg_errors() -> Iterator[None]:
    """Around a psycopg (or pool) call: what it raises leaves as ``from_psycopg(exc)``."""
    import psycopg  # its caller holds a psycopg connection or pool: loaded already

    try:
        yield
    except psycopg.Error as exc:
        raise from_psycopg(exc) from exc
