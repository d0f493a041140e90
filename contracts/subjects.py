"""Subject, stream and consumer names in one place.

Everything hangs off one prefix (``coleta`` by default) so that several deployments, or several
tests, can share a NATS server without seeing each other's messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["DEFAULT_PREFIX", "Subjects"]

DEFAULT_PREFIX = "coleta"
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

    @property
    def raw_stream(self) -> str:
        return f"{self.prefix.upper()}_RAW"

    # durable consumers (names are per stream, so they need no prefix)
    fetcher_consumer: ClassVar[str] = "fetcher"
    runs_consumer: ClassVar[str] = "runs"
    writer_consumer: ClassVar[str] = "writer"

    # -- request-reply service
    @property
    def service_name(self) -> str:
        return self.prefix

    def endpoint(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def status(self) -> str:
        return self.endpoint("status")

    @property
    def trigger(self) -> str:
        return self.endpoint("trigger")

    @property
    def runs(self) -> str:
        return self.endpoint("runs")

    @property
    def health(self) -> str:
        return self.endpoint("health")

    @property
    def dlq_replay(self) -> str:
        return self.endpoint("dlq.replay")
