"""Progress lines: bytes, MB/s and ETA, at most one per interval."""

from __future__ import annotations

import io

import pytest

from pifarm_agent.progress import Progress, format_duration, format_progress


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.4, "59s"),
        (75, "1m15s"),
        (3725, "1h02m05s"),
        (float("inf"), "?"),
        (float("nan"), "?"),
        (-1, "?"),
    ],
)
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


def test_a_progress_line_has_bytes_percent_rate_and_eta():
    line = format_progress("model gemma3-270m 1.0.0", 126_556_512, 253_113_024, 50_000_000)
    assert line == "model gemma3-270m 1.0.0: 126.6/253.1 MB (50.0%) 50.0 MB/s ETA 3s"
    assert format_progress("m", 0, 100, 0).endswith("0.0 MB/s ETA ?")


def test_lines_are_rate_limited_and_resumed_bytes_do_not_count_towards_the_rate():
    now = [100.0]
    out = io.StringIO()
    progress = Progress("m", 10_000_000, resumed=4_000_000, interval=5.0, stream=out, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1.0
        progress.update(200_000)
    # Ten updates over ten seconds: a line at 5 s and at 10 s, not ten lines.
    lines = out.getvalue().splitlines()
    assert lines == [
        "m: 5.0/10.0 MB (50.0%) 0.2 MB/s ETA 25s",
        "m: 6.0/10.0 MB (60.0%) 0.2 MB/s ETA 20s",
    ]
    progress.finish()
    assert out.getvalue().splitlines()[-1] == "m: fetched 2.0 MB in 10s (0.2 MB/s), 6.0/10.0 MB on disk"
