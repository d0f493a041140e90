"""The daemon's settings: its sources and where its bus and database are.

Unknown keys are errors here (a typo in a config file must not pass silently), unlike on the
wire. ``ROLES`` are the stages a process may run (``coleta run --role``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec

from contracts import DEFAULT_PREFIX
from daemon.errors import ConfigError
from daemon.platform.nats_auth import NatsAuth
from daemon.settings._source import SourceConfig
from daemon.settings._units import MINUTES, SECONDS, PositiveFloat, PositiveInt

__all__ = ["MAX_WORKERS", "ROLES", "Settings", "parse_roles", "with_workers"]

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Most fetcher-and-writer processes ``workers`` may ask for.
MAX_WORKERS = 64

#: The stages a process can run, in start order (downstream first).
ROLES = ("writer", "fetcher", "service", "ticker")


def parse_roles(text: str | Iterable[str]) -> frozenset[str]:
    """``"ticker,service"`` → the roles; ConfigError naming an unknown one."""
    names = text.split(",") if isinstance(text, str) else list(text)
    roles = frozenset(name.strip() for name in names if name.strip())
    unknown = sorted(roles - set(ROLES))
    if unknown or not roles:
        what = f"unknown role {unknown[0]!r}" if unknown else "no role given"
        raise ConfigError(f"--role: {what} (roles: {', '.join(ROLES)})")
    return roles


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the daemon needs; built once, validated when built."""

    sources: list[SourceConfig] = []
    #: ``nats://…`` or ``tls://…``; unset → an embedded nats-server under ``state_dir``.
    nats_url: str | None = None
    #: NATS user, and its password as ``{ secret = "…" }`` (``NATS_USER``, ``NATS_PASSWORD``).
    nats_user: str | None = None
    nats_password: str | None = None
    #: A ``.creds`` file (``NATS_CREDS``), or an NKey seed file (``NATS_NKEY``).
    nats_creds: str | None = None
    nats_nkey: str | None = None
    #: The CA that signed the NATS server's certificate (``NATS_CA``): TLS becomes compulsory.
    nats_ca: str | None = None
    #: A client certificate and its key for mutual TLS (``NATS_CERT``, ``NATS_KEY``).
    nats_cert: str | None = None
    nats_key: str | None = None
    #: libpq URL; unset → an embedded PostgreSQL under ``state_dir``.
    database_url: str | None = None
    state_dir: str = ".coleta"
    log_level: str = "INFO"
    #: Prefix of every subject and stream, so deployments can share a NATS server.
    bus_prefix: str = DEFAULT_PREFIX
    #: PostgreSQL schema holding coleta's tables.
    database_schema: str = "public"
    max_concurrent_fetches: PositiveInt = 8
    #: How long a SIGTERM waits for in-flight work before handing it back.
    shutdown_grace_s: PositiveFloat = 10 * SECONDS
    #: At start-up, how long to keep trying NATS and PostgreSQL before exiting with code 3.
    connect_timeout_s: PositiveFloat = 60 * SECONDS
    writer_batch_size: PositiveInt = 256
    #: How long a message may stay unacknowledged before JetStream redelivers it (a crashed
    #: daemon's runs are redone after this). Long runs send progress so they are not redelivered.
    ack_wait_s: PositiveFloat = 30 * SECONDS
    #: How long JetStream keeps commands and payloads (and de-duplicates run ids).
    stream_max_age_s: PositiveFloat = 7 * 24 * 60 * MINUTES
    duplicate_window_s: PositiveFloat = 60 * MINUTES
    #: Copies JetStream keeps of each stream (1, or 3/5 on a NATS cluster).
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    #: Where JetStream keeps the streams: ``file`` (survives restarts) or ``memory``.
    stream_storage: Literal["file", "memory"] = "file"
    #: Deliveries of one message to a consumer before it becomes a dead letter (the fetcher's
    #: consumer allows at least every source's ``retries.max_attempts`` plus 10).
    max_deliveries: Annotated[int, msgspec.Meta(ge=2, le=10_000)] = 20
    #: Failed runs in a row that make a source ``failing`` and the daemon degraded (a source's
    #: own ``failures_before_degraded`` wins).
    failures_before_degraded: PositiveInt = 3
    #: Processes on this machine running the fetcher and the writer (``coleta run --workers``):
    #: ``coleta run`` starts and supervises the ones beyond itself; ``"auto"``: one per core.
    workers: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)] | Literal["auto"] = 1

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            if source.name in seen:
                raise ValueError(
                    f"sources[{i}].name: duplicate source name {source.name!r}"
                    f" (first defined at sources[{seen[source.name]}])"
                )
            seen[source.name] = i
        if self.log_level.upper() not in _LEVELS:
            raise ValueError(f"log_level: {self.log_level!r} is not one of {', '.join(_LEVELS)}")
        if not re.match(r"^[a-z][a-z0-9_]*$", self.bus_prefix):
            raise ValueError(f"bus_prefix: {self.bus_prefix!r} must match [a-z][a-z0-9_]*")
        if not re.match(r"^[a-z_][a-z0-9_]*$", self.database_schema):
            raise ValueError(
                f"database_schema: {self.database_schema!r} must match [a-z_][a-z0-9_]*"
            )
        if self.duplicate_window_s > self.stream_max_age_s:
            raise ValueError(
                f"duplicate_window_s: {self.duplicate_window_s} must not exceed"
                f" stream_max_age_s ({self.stream_max_age_s})"
            )
        _check_nats_auth(self)

    def __repr__(self) -> str:
        hidden = {"nats_password"} if self.nats_password else set()
        shown = ", ".join(
            f"{name}={'<secret>' if name in hidden else repr(getattr(self, name))}"
            for name in self.__struct_fields__
        )
        return f"Settings({shown})"

    def nats_auth(self) -> NatsAuth:
        """How to authenticate to ``nats_url`` (``nats_auth``)."""
        return NatsAuth(
            user=self.nats_user,
            password=self.nats_password,
            creds=self.nats_creds,
            nkey=self.nats_nkey,
            ca=self.nats_ca,
            cert=self.nats_cert,
            key=self.nats_key,
        )

    def failures_limit(self, source: SourceConfig) -> int:
        """Failed runs in a row that make ``source`` failing: its own key, or the top-level."""
        return source.failures_before_degraded or self.failures_before_degraded

    @property
    def worker_processes(self) -> int:
        """How many processes of this deployment's machine fetch and write (``workers``,
        ``"auto"`` resolved to the cores this process may use). Above 1, several fetchers share
        the sources: leases must keep one run per source at a time. Processes started apart
        with ``--role`` are not counted here; they need leases too."""
        if self.workers == "auto":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            return max(1, min(MAX_WORKERS, cores or os.cpu_count() or 1))
        return self.workers

    def source(self, name: str) -> SourceConfig | None:
        for source in self.sources:
            if source.name == name:
                return source
        return None


def _check_nats_auth(settings: Settings) -> None:
    identities = [key for key in ("nats_user", "nats_creds", "nats_nkey") if getattr(settings, key)]
    if len(identities) > 1:
        raise ValueError(
            f"{identities[1]}: give one of nats_user, nats_creds or nats_nkey"
            f" (also set: {identities[0]}; the NATS_* variables count too)"
        )
    if settings.nats_password is not None and settings.nats_user is None:
        raise ValueError("nats_password: needs nats_user (NATS_USER)")
    if (settings.nats_cert is None) != (settings.nats_key is None):
        missing = "nats_key" if settings.nats_key is None else "nats_cert"
        raise ValueError(f"{missing}: mutual TLS needs both nats_cert and nats_key")


def with_workers(settings: Settings, text: str) -> Settings:
    """``settings`` with ``workers`` from ``coleta run --workers`` (a count or ``auto``);
    ConfigError naming the bad value."""
    value: int | str = int(text) if text.strip().isdigit() else text.strip()
    if value != "auto" and not (isinstance(value, int) and 1 <= value <= MAX_WORKERS):
        raise ConfigError(f"--workers: {text!r} is not a count from 1 to {MAX_WORKERS} or 'auto'")
    return msgspec.structs.replace(settings, workers=value)
