"""Progress: a tqdm bar on a terminal, a one-line update every ``every`` seconds in a log file.

Both show an ETA from the measured time per item: (items left) x (elapsed / items done).
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "",
             every: float = 10.0, stream=None) -> Iterator[T]:
    """Yield ``items``; ``every=math.inf`` silences the log lines (the bar stays on a terminal)."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, file=stream)
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every or (done == total and every != float("inf")):
            last = now
            of = f"/{total}" if total else ""
            eta = f", ETA {format_seconds((total - done) * (now - start) / done)}" if total else ""
            print(f"[{desc}] {done}{of} done, {now - start:.1f}s elapsed{eta}", file=stream,
                  flush=True)


def format_seconds(seconds: float) -> str:
    """12.3s, 4m05s, 7h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
