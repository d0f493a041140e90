"""Content-Encoding undone a bounded piece at a time, so a body costs no more memory than
``piece`` bytes however far it expands.

httpx decodes each raw chunk whole: a 1 MB gzip body of zeros cost 268 MiB at its peak and a
1.6 KB brotli one 1 GiB, before ``max_response_bytes`` could refuse them. ``_send`` reads raw
bytes and decodes them here instead, as httpx would: the codings named by ``Content-Encoding``
undone from the last; ``gzip``, ``deflate`` (zlib-wrapped, or raw when the first bytes are not)
and ``br``; ``identity`` and codings it does not know passed through as they are. A body that
does not decode raises ``httpx.DecodingError`` (``bad_encoding`` to ``errors.from_httpx``).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Protocol

import brotli
import httpx

__all__ = ["decoded"]


class _Decoder(Protocol):
    def feed(self, data: bytes, piece: int) -> Iterator[bytes]: ...


class _Zlib:
    """gzip, or deflate: zlib-wrapped, or raw if the first bytes do not decode (as httpx)."""

    def __init__(self, wbits: int, *, raw_fallback: bool = False) -> None:
        self._object = zlib.decompressobj(wbits)
        self._raw_fallback = raw_fallback

    def feed(self, data: bytes, piece: int) -> Iterator[bytes]:
        fallback, self._raw_fallback = self._raw_fallback, False
        try:
            while True:
                out = self._object.decompress(data, piece)
                data = self._object.unconsumed_tail
                if out:
                    fallback = False
                    yield out
                if not data and len(out) < piece:
                    return
        except zlib.error as exc:
            if fallback:
                self._object = zlib.decompressobj(-zlib.MAX_WBITS)
                yield from self.feed(data, piece)
                return
            raise httpx.DecodingError(str(exc)) from exc


class _Brotli:
    def __init__(self) -> None:
        self._object = brotli.Decompressor()

    def feed(self, data: bytes, piece: int) -> Iterator[bytes]:
        try:
            out: bytes = self._object.process(data, output_buffer_limit=piece)
            while True:
                if out:
                    yield out
                if self._object.can_accept_more_data():
                    return
                out = self._object.process(b"", output_buffer_limit=piece)
        except brotli.error as exc:
            raise httpx.DecodingError(str(exc)) from exc


def _decoder(coding: str) -> _Decoder | None:
    if coding == "gzip":
        return _Zlib(zlib.MAX_WBITS | 16)
    if coding == "deflate":
        return _Zlib(zlib.MAX_WBITS, raw_fallback=True)
    if coding == "br":
        return _Brotli()
    return None  # identity, or a coding httpx would not undo either


def _through(decoder: _Decoder, pieces: Iterable[bytes], piece: int) -> Iterator[bytes]:
    for data in pieces:
        yield from decoder.feed(data, piece)


async def decoded(
    raw: AsyncIterable[bytes], content_encoding: str | None, *, piece: int
) -> AsyncIterator[bytes]:
    """The body ``raw`` (as it came over the wire) decoded, in pieces of about ``piece`` bytes
    at most; raw chunks as they are when there is nothing to undo."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    decoders = [d for d in map(_decoder, reversed(codings)) if d is not None]
    async for chunk in raw:
        pieces: Iterable[bytes] = [chunk]
        for decoder in decoders:
            pieces = _through(decoder, pieces, piece)
        for out in pieces:
            yield out
