"""Atomic file output (write to a temporary sibling, then rename), JSON and CSV helpers,
and the stable hash of a params slice.

A job killed mid-write leaves no half-written result behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# In every temporary name: what a SIGKILL (which no handler sees) leaves behind is
# matched by .dvcignore, so DVC never versions it, and named by this marker.
PARTIAL = ".partial-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{PARTIAL}",
                               suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are as readable as any file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(frame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def prune_empty_dirs(folder: str | Path, levels: int = 1) -> None:
    """Remove ``folder``, then up to ``levels - 1`` of its parents, while each is an empty
    directory: a failed job leaves no empty ``data/<name>/`` or ``checkpoints/...`` behind
    (Snakemake makes a job's output folders before it runs)."""
    folder = Path(folder)
    for path in [folder, *folder.parents][:levels]:
        if not path.exists():
            continue
        if not path.is_dir() or any(path.iterdir()) or path.resolve() == Path.cwd():
            return
        path.rmdir()


def params_hash(slice_) -> str:
    """Short stable hash of a params slice: it tags every MLflow run and names the
    checkpoint folders of a run's settings."""
    blob = json.dumps(slice_, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
