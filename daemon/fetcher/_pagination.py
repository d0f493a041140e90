"""Pagination: from one response, the request for the next page — or the end of the run.

Kinds: ``page`` (page number parameter), ``offset`` (offset/limit parameters), ``cursor`` (a
cursor taken from a JSON path in the body, sent as a parameter), ``link`` (the
``Link: <…>; rel="next"`` header) and ``next_url`` (a next-page URL at a JSON path in the body).
Stop conditions: an empty page, a has-more flag at a JSON path, a total count reached, or
``max_pages``. A cursor or URL that repeats is an error, never an endless loop; so is a ``page``
or ``offset`` walk over pages with no list of records and no has-more flag or total to stop it.

Paths look like ``data.items`` or ``results[0].rows`` (``daemon.jsonpath``); ``records_path``
may also be ``"$"``, the body itself. The configuration is ``settings.Pagination``.

Pure: the fetcher owns the I/O and keeps a ``PageState`` between pages (and across retries,
so a failure on page N retries page N, not page 0).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote_plus, unquote_plus

import httpx
import msgspec

from daemon.errors import PaginationError
from daemon.jsonpath import TOP, json_path
from daemon.settings import Pagination

__all__ = ["PageState", "first_page_params", "next_page", "records_of", "set_param"]

_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*\brel\s*=\s*"?next"?', re.IGNORECASE)


class PageState(msgspec.Struct, kw_only=True):
    """Where a run is: the page about to be fetched and what was seen before it (kept in the
    progress bucket between attempts, inside ``_progress.Progress``)."""

    page: int = 0
    #: The next request's URL (absolute, query included); None for the first page.
    url: str | None = None
    records_seen: int = 0
    #: Cursors and next-page URLs seen so far (``cursor:…``, ``url:…``): one seen again loops.
    seen: list[str] = []


def records_of(body: Any, pagination: Pagination | None) -> list[Any] | None:
    """A page's records: at ``records_path``, or the body when it is a list."""
    path = pagination.records_path if pagination and pagination.records_path else TOP
    found = json_path(body, path)
    return found if isinstance(found, list) else None


def first_page_params(p: Pagination) -> dict[str, str]:
    """Parameters the first request carries."""
    params: dict[str, str] = {}
    if p.kind == "page":
        params[p.page_param] = str(p.first_page)
    elif p.kind == "offset":
        params[p.offset_param] = "0"
        params[p.limit_param] = str(p.limit)
    if p.size_param and p.size:
        params[p.size_param] = str(p.size)
    return params


def next_page(
    p: Pagination,
    state: PageState,
    request_url: httpx.URL,
    response_headers: httpx.Headers,
    body: Any,
) -> PageState | None:
    """The state for the page after ``state.page``, or None when the run has all its pages.

    ``body`` is the decoded JSON body of the page just fetched, or its ``PageFields`` (None
    when not JSON). A ``page`` or ``offset`` walk stops on an empty or short page: a page
    without a list of records (and no has-more flag or total to stop on) is an error, or the
    walk would go on to ``max_pages`` whatever the API says.
    """
    records = records_of(body, p)
    seen_now = state.records_seen + (len(records) if records is not None else 0)
    if state.page + 1 >= p.max_pages:
        return None
    if records is not None and not records:
        return None
    if (
        records is None
        and p.kind in ("page", "offset")
        and p.has_more_path is None
        and p.total_path is None
    ):
        where = (
            f"records_path {p.records_path!r}"
            if p.records_path not in (None, TOP)
            else "the top level (the body is not a list)"
        )
        raise PaginationError(
            f"no list of records at {where}: {p.kind} pagination needs one to know when to stop"
            " (set records_path, or has_more_path / total_path)",
            code="pagination_no_records",
        )
    if p.has_more_path is not None and json_path(body, p.has_more_path) is False:
        return None
    if p.total_path is not None:
        total = json_path(body, p.total_path)
        if isinstance(total, int) and seen_now >= total:
            return None
    nxt = PageState(page=state.page + 1, records_seen=seen_now, seen=list(state.seen))
    if p.kind == "page":
        nxt.url = set_param(request_url, p.page_param, str(p.first_page + state.page + 1))
    elif p.kind == "offset":
        if records is not None and len(records) < p.limit:
            return None
        offset = int(request_url.params.get(p.offset_param, "0") or 0) + p.limit
        nxt.url = set_param(request_url, p.offset_param, str(offset))
    elif p.kind == "cursor":
        assert p.cursor_path is not None
        cursor = json_path(body, p.cursor_path)
        if cursor in (None, "", False):
            return None
        token = str(cursor)
        _remember(nxt, f"cursor:{token}", f"cursor {token!r} repeats")
        nxt.url = set_param(request_url, p.cursor_param, token)
    elif p.kind == "link":
        match = _LINK_NEXT.search(response_headers.get("link", ""))
        if match is None:
            return None
        url = _join(request_url, match.group(1))
        _remember(nxt, f"url:{url}", f"next-page URL {url!r} repeats")
        nxt.url = url
    else:
        assert p.next_url_path is not None
        link = json_path(body, p.next_url_path)
        if not isinstance(link, str) or not link:
            return None
        url = _join(request_url, link)
        _remember(nxt, f"url:{url}", f"next-page URL {url!r} repeats")
        nxt.url = url
    return nxt


def _join(base: httpx.URL, link: str) -> str:
    """``link`` (the API's) resolved against ``base``; as it is when it is no URL at all, which
    ``_request.next_request`` then refuses (``bad_url``) like any other it cannot request."""
    try:
        return str(base.join(link))
    except (httpx.InvalidURL, UnicodeError):
        return link


def set_param(url: httpx.URL, name: str, value: str) -> str:
    """``url`` with the query parameter ``name`` set to ``value`` (form-encoded, as httpx does),
    everything else byte for byte.

    ``httpx.URL.copy_set_param`` re-parses and re-encodes the whole URL (``%20`` becomes ``+``
    in other parameters) and cost 130 us a page in the throughput profile.
    """
    raw = str(url)
    base, hashed, fragment = raw.partition("#")
    path, _, query = base.partition("?")
    pair = f"{quote_plus(name, safe='')}={quote_plus(value, safe='')}"
    parts: list[str] = []
    placed = False
    for part in query.split("&") if query else ():
        if unquote_plus(part.partition("=")[0]) == name:
            if not placed:
                parts.append(pair)
                placed = True
        else:
            parts.append(part)
    if not placed:
        parts.append(pair)
    return f"{path}?{'&'.join(parts)}" + (f"#{fragment}" if hashed else "")


def _remember(state: PageState, key: str, message: str) -> None:
    if key in state.seen:
        raise PaginationError(message)
    state.seen.append(key)
