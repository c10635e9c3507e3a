"""Progress: a tqdm bar on a terminal, a one-line update every ``every`` seconds in a log file."""
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
            print(f"[{desc}] {done}{of} done, {now - start:.1f}s elapsed", file=stream, flush=True)
