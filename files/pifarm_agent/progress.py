"""Download progress lines for the journal: bytes, MB/s and ETA, rate-limited.

Under systemd stderr goes to the journal, so a line every few seconds is what an
operator watching ``journalctl -fu`` needs; a line per chunk would flood it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

MB = 1_000_000


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; ``3725`` -> ``"1h02m05s"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_progress(label: str, done: int, total: int, rate: float) -> str:
    """One progress line; ``rate`` is bytes per second of this transfer (0 if unknown)."""
    percent = 100.0 * done / total if total else 100.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (
        f"{label}: {done / MB:.1f}/{total / MB:.1f} MB ({percent:.1f}%) "
        f"{rate / MB:.1f} MB/s ETA {format_duration(eta)}"
    )


class Progress:
    """Counts bytes of one transfer and writes a line at most every ``interval`` seconds.

    ``resumed`` bytes were already on disk before this transfer started: they count
    towards ``done`` but not towards the rate.
    """

    def __init__(  # noqa: PLR0913 - the clock and stream are injectable for tests
        self,
        label: str,
        total: int,
        resumed: int = 0,
        *,
        interval: float = 5.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.resumed = resumed
        self.fetched = 0
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self._last_line = self.started
        self.lines = 0

    @property
    def done(self) -> int:
        return self.resumed + self.fetched

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.fetched / elapsed if elapsed > 0 else 0.0

    def update(self, nbytes: int) -> None:
        self.fetched += nbytes
        now = self.clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._write(format_progress(self.label, self.done, self.total, self.rate()))

    def finish(self) -> None:
        elapsed = self.clock() - self.started
        self._write(
            f"{self.label}: fetched {self.fetched / MB:.1f} MB in {format_duration(elapsed)} "
            f"({self.rate() / MB:.1f} MB/s), {self.done / MB:.1f}/{self.total / MB:.1f} MB on disk"
        )

    def _write(self, line: str) -> None:
        self.lines += 1
        self.stream.write(line + "\n")
        self.stream.flush()
