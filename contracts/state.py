"""Values kept in the bus's key-value buckets that more than one stage reads.

``<prefix>_sources`` holds, per source (the key is its name), what its last stored run left
for the next one: the writer copies it there from the ``source_state`` table after each commit
(PostgreSQL stays the source of truth), and the fetcher reads it before a run.
"""

from __future__ import annotations

from typing import Any

from contracts._base import WireStruct

__all__ = ["SourceState"]


class SourceState(WireStruct, frozen=True, kw_only=True):
    """How a source's next run asks: the validators of its last stored response (one-request
    runs) and its incremental cursor."""

    etag: str | None = None
    last_modified: str | None = None
    #: The SHA-256 (hex) of the last stored body, for ``skip_unchanged``.
    body_sha256: str | None = None
    #: The largest tracked field among the records stored so far, as JSON (a string, a number).
    cursor: Any = None
