"""Standard output and error that never drop what is written to them.

Under ``PYTHONUNBUFFERED=1`` (``python -u``; our Containerfile sets it, as container images
often do) ``sys.stdout`` is a text layer straight over the file descriptor. A write to a pipe
whose reader is slow can be cut short by a signal (SIGHUP for a reload, SIGSTOP/SIGCONT from a
shell or a profiler), and that layer ignores the short count: the rest of the text is lost and
nothing says so (CPython gh-85393). ``coleta runs --json | jq`` then reads half a document,
and a JSON log line longer than the pipe's atomic size is cut in two. A buffered layer
between them writes the rest; flushing at every line keeps what ``-u`` is for.
"""

from __future__ import annotations

import io
import sys
from typing import TextIO

__all__ = ["never_drop_output"]


def never_drop_output() -> None:
    """Put a buffered writer under ``sys.stdout`` and ``sys.stderr`` where there is none."""
    sys.stdout = _buffered(sys.stdout)
    sys.stderr = _buffered(sys.stderr)


def _buffered(stream: TextIO) -> TextIO:
    raw = getattr(stream, "buffer", None)
    if not isinstance(stream, io.TextIOWrapper) or not isinstance(raw, io.RawIOBase):
        return stream  # already buffered, or not a file (a test's capture)
    # The old wrapper keeps owning the descriptor (sys.__stdout__ still holds it).
    writer = io.BufferedWriter(io.FileIO(raw.fileno(), "w", closefd=False))
    return io.TextIOWrapper(
        writer,
        encoding=stream.encoding,
        errors=stream.errors,
        line_buffering=True,
        write_through=True,
    )
