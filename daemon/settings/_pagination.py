"""``[sources.pagination]``: how a source pages its results.

Kinds: ``page`` (page number parameter), ``offset`` (offset/limit parameters), ``cursor`` (a
cursor taken from a JSON path in the body, sent as a parameter), ``link`` (the
``Link: <…>; rel="next"`` header) and ``next_url`` (a next-page URL at a JSON path in the body).
Stop conditions: an empty page, a has-more flag at a JSON path, a total count reached, or
``max_pages``. The fetcher follows them (``fetcher._pagination``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from daemon.jsonpath import check_path, check_records_path
from daemon.settings._units import PositiveInt, field_check

__all__ = ["Pagination"]


class Pagination(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a source pages its results (``[sources.pagination]``)."""

    kind: Literal["page", "offset", "cursor", "link", "next_url"]
    #: kind = "page": the page-number parameter and the first page's number.
    page_param: str = "page"
    first_page: int = 1
    #: Optional page-size parameter sent with every page (``page`` and ``offset`` kinds).
    size_param: str | None = None
    size: PositiveInt | None = None
    #: kind = "offset": the offset and limit parameters and the limit sent.
    offset_param: str = "offset"
    limit_param: str = "limit"
    limit: PositiveInt = 100
    #: kind = "cursor": where the next cursor is in the body, and the parameter it is sent as.
    cursor_path: str | None = None
    cursor_param: str = "cursor"
    #: kind = "next_url": where the next page's URL is in the body.
    next_url_path: str | None = None
    #: Where a page's records are (``"$"``, or unset: the body itself when it is a list).
    records_path: str | None = None
    #: A boolean at this path says whether more pages follow.
    has_more_path: str | None = None
    #: The total number of records, at this path: stop once that many were seen.
    total_path: str | None = None
    #: Never fetch more pages than this in one run.
    max_pages: PositiveInt = 1000

    def __post_init__(self) -> None:
        if self.kind == "cursor" and not self.cursor_path:
            raise ValueError("cursor_path: required when kind = 'cursor'")
        if self.kind == "next_url" and not self.next_url_path:
            raise ValueError("next_url_path: required when kind = 'next_url'")
        if self.records_path is not None:
            field_check("records_path", check_records_path, self.records_path)
        for name in ("cursor_path", "next_url_path", "has_more_path", "total_path"):
            path = getattr(self, name)
            if path is not None:
                field_check(name, check_path, path)
