"""The one exception tree of coleta.

Third-party exceptions (httpx, psycopg, nats) are translated at the boundary with
``raise Mapped(...) from exc``, so the stages decide what to do from the branch alone::

    ColetaError
    ├── ConfigError            bad configuration: names the key path and the value
    ├── TransientError         worth retrying later (redeliver with backoff)
    │   ├── FetchTransient     connection error, timeout, HTTP 429 or 5xx
    │   └── StoreUnavailable   PostgreSQL unreachable or restarting
    └── PermanentError         retrying cannot help: the run fails with this reason
        ├── FetchPermanent     other HTTP 4xx, body too large, bad request built from config
        └── PoisonMessage      a bus message that fails contract validation

Errors carry fields (source, url, status) as well as text; ``code`` is the stable
machine-readable reason stored with a failed run.
"""

from __future__ import annotations

__all__ = [
    "ColetaError",
    "ConfigError",
    "FetchPermanent",
    "FetchTransient",
    "PermanentError",
    "PoisonMessage",
    "StoreUnavailable",
    "TransientError",
]


class ColetaError(Exception):
    """Base of every error coleta raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class ConfigError(ColetaError):
    """The configuration is invalid; the message names the key path and the bad value."""

    code = "config"


class TransientError(ColetaError):
    """A failure that may go away: the message is handed back and retried later."""

    code = "transient"


class PermanentError(ColetaError):
    """A failure that retrying cannot fix: the run is recorded as failed."""

    code = "permanent"


class _FetchMixin:
    source: str
    url: str
    status: int | None

    def _set_fetch_fields(self, source: str, url: str, status: int | None) -> None:
        self.source = source
        self.url = url
        self.status = status


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


class FetchPermanent(PermanentError, _FetchMixin):
    """Any other 4xx, or a response coleta refuses (too large)."""

    def __init__(
        self, message: str, *, source: str, url: str, status: int | None = None, code: str
    ) -> None:
        super().__init__(message, code=code)
        self._set_fetch_fields(source, url, status)


class StoreUnavailable(TransientError):
    """PostgreSQL cannot be reached or is restarting."""

    code = "store_unavailable"


class PoisonMessage(PermanentError):
    """A bus message that fails contract validation: never retried."""

    code = "poison"

    def __init__(self, message: str, *, subject: str) -> None:
        super().__init__(message)
        self.subject = subject
