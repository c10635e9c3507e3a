"""SIGTERM as an exception, and the short sections a signal must not cut in two.

``scancel``, ``kill`` and Snakemake ending a job send SIGTERM; :func:`install` makes it
raise :class:`Terminated`, as SIGINT raises KeyboardInterrupt, so a killed command cleans
up as after any other failure. Inside :func:`uninterrupted` (an MLflow database call) both
signals wait until the section ends: an exception raised in the middle of a SQLite
transaction leaves the database locked, and the FAILED status written next would wait
on that lock.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager


class Terminated(BaseException):
    """The process got SIGTERM. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it."""


_depth = 0
_pending: list[int] = []


def _raise(signum: int):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def _handler(signum, _frame):
    if _depth:
        _pending.append(signum)
    else:
        _raise(signum)


def install() -> None:
    """Route SIGTERM and SIGINT through :func:`_handler` (main thread only)."""
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


@contextmanager
def uninterrupted():
    """Deliver SIGTERM/SIGINT that arrive inside the block when it ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise(signum)
