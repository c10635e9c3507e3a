"""Shared by every figure module: a headless matplotlib and atomic PNG + PDF output."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on laptops-over-ssh, CI or cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` atomically, then close the figure."""
    paths = []
    for ext in ("png", "pdf"):
        path = Path(out_dir) / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths
