"""Subject, stream and consumer names in one place.

Everything hangs off one prefix (``coleta`` by default) so that several deployments, or several
tests, can share a NATS server without seeing each other's messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["DEFAULT_PREFIX", "ENDPOINTS", "Subjects", "source_of", "subject_token"]

DEFAULT_PREFIX = "coleta"
#: The request-reply service's endpoints, each on ``<prefix>.<endpoint>``.
ENDPOINTS = ("status", "trigger", "runs", "health", "dlq.replay", "backfill", "backfill.progress")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Subjects:
    """Names derived from one prefix: ``coleta.collect.<source>``, ``COLETA_RAW`` …"""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"bus prefix must match [a-z][a-z0-9_]*, got {self.prefix!r}")

    # -- work streams: tick → command → fetch → raw payload → write
    def collect(self, source: str) -> str:
        return f"{self.prefix}.collect.{source}"

    def raw(self, source: str) -> str:
        return f"{self.prefix}.raw.{source}"

    def is_collect(self, subject: str) -> bool:
        """Whether ``subject`` is one of this prefix's collect subjects."""
        return subject.startswith(f"{self.prefix}.collect.")

    @property
    def collect_all(self) -> str:
        return f"{self.prefix}.collect.>"

    @property
    def raw_all(self) -> str:
        return f"{self.prefix}.raw.>"

    def dlq(self, source: str, code: str = "*") -> str:
        """``<prefix>.dlq.<source>.<error code>``: four tokens, so the stream never captures
        the service's ``<prefix>.dlq.replay`` requests."""
        return f"{self.prefix}.dlq.{source}.{code}"

    @property
    def dlq_all(self) -> str:
        return f"{self.prefix}.dlq.*.*"

    @property
    def dlq_stream(self) -> str:
        return f"{self.prefix.upper()}_DLQ"

    @property
    def bodies_bucket(self) -> str:
        """Object store for bodies larger than the NATS max payload."""
        return f"{self.prefix}_bodies"

    @property
    def leases_bucket(self) -> str:
        """Key-value bucket of per-source run leases (one run per source at a time)."""
        return f"{self.prefix}_leases"

    @property
    def progress_bucket(self) -> str:
        """Key-value bucket of paginated runs' progress (a failed page retries from itself)."""
        return f"{self.prefix}_progress"

    @property
    def sources_bucket(self) -> str:
        """Key-value bucket mirroring ``source_state``: validators and incremental cursors."""
        return f"{self.prefix}_sources"

    @property
    def collect_stream(self) -> str:
        return f"{self.prefix.upper()}_COLLECT"

    # -- commands of a busy source wait here, outside the fetcher's delivery window
    def deferred(self, source: str) -> str:
        return f"{self.prefix}.deferred.{source}"

    @property
    def deferred_all(self) -> str:
        return f"{self.prefix}.deferred.*"

    @property
    def defer_stream(self) -> str:
        return f"{self.prefix.upper()}_DEFER"

    @property
    def raw_stream(self) -> str:
        return f"{self.prefix.upper()}_RAW"

    @property
    def streams(self) -> tuple[str, ...]:
        """Every JetStream stream the pipeline needs, its buckets' included (a KV bucket is
        the stream ``KV_<bucket>``, an object store ``OBJ_<bucket>``)."""
        return (
            self.collect_stream,
            self.raw_stream,
            self.dlq_stream,
            self.defer_stream,
            f"OBJ_{self.bodies_bucket}",
            f"KV_{self.leases_bucket}",
            f"KV_{self.progress_bucket}",
            f"KV_{self.sources_bucket}",
        )

    # durable consumers (names are per stream, so they need no prefix)
    fetcher_consumer: ClassVar[str] = "fetcher"
    runs_consumer: ClassVar[str] = "runs"
    writer_consumer: ClassVar[str] = "writer"

    @property
    def consumers(self) -> tuple[tuple[str, str], ...]:
        """Every durable consumer the pipeline needs, as ``(stream, consumer)``."""
        return (
            (self.collect_stream, self.fetcher_consumer),
            (self.collect_stream, self.runs_consumer),
            (self.raw_stream, self.writer_consumer),
        )

    # -- request-reply service: ``<prefix>.<endpoint>``
    @property
    def service_name(self) -> str:
        return self.prefix

    def endpoint(self, name: str) -> str:
        """``<prefix>.<name>``: one of ``ENDPOINTS``."""
        return f"{self.prefix}.{name}"

    # -- JetStream's own subjects
    @staticmethod
    def max_deliveries_advisories(stream: str) -> str:
        """Where JetStream says a message of ``stream`` exhausted a consumer's deliveries."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"

    @staticmethod
    def kv_key(bucket: str, key: str) -> str:
        """The subject a key-value bucket keeps ``key`` under."""
        return f"$KV.{bucket}.{key}"


def source_of(subject: str, default: str = "_") -> str:
    """The source a work subject names (``<prefix>.collect.<source>``, ``.raw.``,
    ``.deferred.``, ``.dlq.<source>.<code>``): its third token, whatever the message claims."""
    tokens = subject.split(".")
    return tokens[2] if len(tokens) > 2 else default


def subject_token(text: str) -> str:
    """``text`` as one subject token: what a hostile message put there cannot add tokens,
    wildcards or whitespace to a subject built from it (a dead letter's)."""
    token = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in text)
    return token[:64] or "_"
