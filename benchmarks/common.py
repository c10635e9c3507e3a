"""What every benchmark shares: the machine it ran on, the load average, and its outputs
(CSV and figures, written atomically through :func:`pipeline.io.atomic_path`)."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch

from pipeline.environment import cpu_model
from pipeline.io import atomic_path


def machine(device: str = "cpu") -> dict:
    """The machine a benchmark ran on: CPU model, cores, torch threads, torch and TorchDEQ
    versions, the device, and the GPU's name (or "none")."""
    try:
        import torchdeq
        tdeq = getattr(torchdeq, "__version__", "") or dist_version("torchdeq")
    except ImportError:
        tdeq = ""
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none"
    return dict(cpu=cpu_model(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, torchdeq=tdeq, device=device, gpu=gpu)


def dist_version(name: str) -> str:
    """An installed distribution's version, or "" where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def load_average() -> float:
    """The 1-minute load average (NaN where the system has none): a busy machine reads high."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    """Every benchmark's CSV, atomically: floats with 6 significant digits; a column a row
    lacks is left empty, a key not in ``columns`` is dropped."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: (f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, ""))
                        for c in columns})


def device_text(row: dict) -> str:
    """Where the row was measured: the GPU's name, or the CPU with no GPU used."""
    if str(row.get("device", "cpu")).startswith("cuda"):
        return f"{row['device']} ({row['gpu']})"
    return "cpu (no GPU used)"


def save_figure(fig, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.pdf (150 dpi), atomically, then close the figure: every
    benchmark's."""
    import matplotlib.pyplot as plt
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        with atomic_path(p) as tmp:  # tmp keeps the suffix: the format
            fig.savefig(tmp, dpi=150)
    plt.close(fig)
    return paths
