"""Keep lines that mean nothing to a segbatch user off the terminal, without hiding anything else.

Ray Data puts each actor pool's constructor arguments in the object store and restarts actors
forever (that is its fault tolerance, which segbatch relies on for node loss). Ray's C++ core worker
then logs an ERROR for every predict actor it creates ("has constructor arguments in the object store
and max_restarts > 0 ..."): the arguments live as long as the dataset, so the case it warns about
cannot happen here. It is written by C++ straight to file descriptor 2, past Python's logging, so the
only way to drop it is to read fd 2 through a pipe and pass every other byte on unchanged.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["RAY_NOISE", "dropping_stderr_lines"]

#: Substrings of lines that are dropped (see the module docstring for why each is safe to drop).
RAY_NOISE = ("has constructor arguments in the object store and max_restarts > 0",)


@contextmanager
def dropping_stderr_lines(patterns: tuple[str, ...] = RAY_NOISE) -> Iterator[TextIO]:
    """Within the block, lines written to fd 2 that contain any of `patterns` are dropped.

    Yields a text stream on the real stderr (a terminal stays a terminal: `isatty()` holds), for
    output that must not wait for a line end, such as a progress bar redrawn with `\\r`.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    needles = [p.encode() for p in patterns]

    def forward() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not any(n in line for n in needles))
            if kept:
                os.write(saved, kept)
        if pending and not any(n in pending for n in needles):
            os.write(saved, pending)

    thread = threading.Thread(target=forward, name="segbatch-stderr", daemon=True)
    thread.start()
    terminal = io.TextIOWrapper(io.FileIO(os.dup(saved), "w"), encoding="utf-8", line_buffering=False, write_through=True)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        terminal.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees EOF and drains
        thread.join(timeout=5)
        os.close(read_end)
        os.close(saved)
        terminal.close()
