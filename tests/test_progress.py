"""pipeline/progress.py: the log-file lines carry an ETA from the measured time per item."""
from __future__ import annotations

import io
import re
import time

from pipeline.progress import format_seconds, progress


def test_log_lines_carry_an_eta_from_the_measured_time_per_item():
    stream = io.StringIO()  # not a terminal: one line per `every` seconds
    for _ in progress(range(4), 4, "job", every=0.0, stream=stream):
        time.sleep(0.05)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("[job] 1/4 done")
    eta = [float(re.search(r"ETA ([0-9.]+)s", line).group(1)) for line in lines]
    # after 1 of 4 items at ~0.05 s each, 3 are left: about 0.15 s; at the end, none
    assert 0.1 <= eta[0] <= 1.0 and eta[-1] == 0.0, lines


def test_silenced_progress_prints_nothing():
    stream = io.StringIO()
    assert list(progress(range(3), 3, "job", every=float("inf"), stream=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_format_seconds():
    assert format_seconds(12.34) == "12.3s"
    assert format_seconds(245) == "4m05s"
    assert format_seconds(7 * 3600 + 125) == "7h02m"
