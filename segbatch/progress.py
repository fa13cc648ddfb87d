"""What a person sees while a run streams: a live bar on a terminal, a line every few seconds in a log.

Ray Data's own progress output is turned off (`pipeline` does that): it counts blocks per operator
and cannot know the job's image count, so it printed `Total Progress: 0/?` every 10 s. This counts
committed rows against the planned total, which is what "how far along is my job" means.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Images done / total, rate, ETA and errors, on `stream`.

    On a terminal (`stream.isatty()`), one line redrawn in place at most `redraw_seconds` apart; on
    anything else (a log file, CI, `ray job logs`), a whole line every `log_seconds`. The rate is
    measured from the first result on, so start-up (Ray, actors, model load) does not drag it down.

    Args:
        total: Images the run will process (planned items).
        stream: Where to write (stderr by default, so stdout keeps just the summary).
        quiet: Write nothing.
        log_seconds: Seconds between lines when not on a terminal.
    """

    WIDTH = 24

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        quiet: bool = False,
        log_seconds: float = 10.0,
        redraw_seconds: float = 0.2,
        unit: str = "images",
    ) -> None:
        self.total = total
        self.unit = unit  # "images"; a several-model job counts "results" (one per image and layer)
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = redraw_seconds if self.tty else log_seconds
        self.done = 0
        self.errors = 0
        self.started = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, rows) of the first result
        self._last_shown = self.started
        self._drawn = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        """Start a ticker so the start-up wait (no results yet) shows as time passing."""
        if not self.quiet:
            self._ticker = threading.Thread(target=self._tick_until_closed, name="segbatch-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tick_until_closed(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            self.tick()

    def rate(self, now: float | None = None) -> float:
        """Images per second since the first result (0 until a second result arrives)."""
        if self._first is None:
            return 0.0
        now = time.monotonic() if now is None else now
        elapsed = now - self._first[0]
        return (self.done - self._first[1]) / elapsed if elapsed > 0 and self.done > self._first[1] else 0.0

    def update(self, rows: int, errors: int = 0) -> None:
        """`rows` more images finished (committed or queued to commit), `errors` of them error rows."""
        with self._lock:
            now = time.monotonic()
            if self._first is None:
                self._first = (now, rows)
            self.done += rows
            self.errors += errors
            if not self.quiet and (now - self._last_shown >= self.interval or self.done >= self.total):
                self._show(now)

    def line(self, now: float | None = None) -> str:
        """The progress text, without bar or line ending."""
        now = time.monotonic() if now is None else now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.rate(now)
        if self._first is None:
            tail = f"starting ({_clock(now - self.started)} so far)"
        elif rate > 0:
            tail = f"{rate:.1f} {self.unit}/s · ETA {_clock((self.total - self.done) / rate)}"
        else:
            tail = "measuring rate"
        errors = f"{self.errors} error{'s' if self.errors != 1 else ''}"
        return f"{self.done}/{self.total} {self.unit} ({pct:.0f}%) · {tail} · {errors}"

    def _show(self, now: float) -> None:
        self._last_shown = now
        if self.tty:
            filled = int(self.WIDTH * self.done / self.total) if self.total else self.WIDTH
            bar = "█" * filled + "░" * (self.WIDTH - filled)
            self.stream.write(f"\r\x1b[2K{bar} {self.line(now)}")
            self._drawn = True
        else:
            self.stream.write(f"segbatch: progress {self.line(now)}\n")
        self.stream.flush()

    def tick(self) -> None:
        """Redraw if due, even without new results (the start-up wait shows as time passing)."""
        with self._lock:
            now = time.monotonic()
            if not self.quiet and now - self._last_shown >= self.interval:
                self._show(now)

    def close(self) -> None:
        """Stop the ticker and end the bar's line, so the summary starts on a fresh one."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self._drawn and not self.quiet:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False
