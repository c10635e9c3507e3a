"""Shared by every figure module: a headless matplotlib, atomic PNG + PDF output, and the
reading of a study's results folders."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on laptops-over-ssh, CI or cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.io import atomic_path, read_json  # noqa: E402

__all__ = ["ReportError", "footer", "load_results", "plt", "save", "scales_datasets", "scope",
           "write_caption"]


class ReportError(RuntimeError):
    """The results cannot make a trustworthy table or figure."""


def load_results(result_dirs, check, csvs=("curves",), key=lambda m: m["name"]) -> dict[str, dict]:
    """{key(metrics): {"metrics": ..., <csv>: DataFrame ...}} of each results folder
    (``metrics.json`` and ``<csv>.csv``). ``check(metrics)`` says why a folder is not the
    study's (a ReportError naming it), or None."""
    import pandas as pd
    out = {}
    for d in map(Path, result_dirs):
        metrics = read_json(d / "metrics.json")
        why = check(metrics)
        if why:
            raise ReportError(f"{d}/metrics.json {why}")
        out[key(metrics)] = {"metrics": metrics, **{c: pd.read_csv(d / f"{c}.csv") for c in csvs}}
    return out


def scales_datasets(metrics) -> tuple[str, str]:
    """The scales and the datasets over all the runs' metrics, each sorted and comma-joined."""
    metrics = list(metrics)
    return tuple(", ".join(sorted({str(m[key]) for m in metrics})) or "none"
                 for key in ("scale", "dataset"))


def scope(metrics) -> str:
    """``scale: ...; dataset: ...`` over all the runs."""
    return "scale: {}; dataset: {}".format(*scales_datasets(metrics))


def footer(fig, text: str) -> None:
    """A grey note below the axes; save's bbox_inches="tight" keeps it in the image."""
    fig.text(0.5, -0.01, text, ha="center", va="top", fontsize=8, color="0.35")


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


def write_caption(path: Path, *, what: str, scale: str, dataset: str, run_ids, commits) -> None:
    """The caption fragment a figure rule writes next to its figure, which the report's
    static caption (workflow/report/*.rst) includes: what the figure shows, the scale,
    the dataset, the MLflow run ids and the commits, all read from the results files."""
    ids = ", ".join(f"``{i}``" for i in sorted(set(run_ids))) or "none (tracking off)"
    text = (f"{what}\n\n"
            f"- **Scale:** {scale}\n- **Dataset:** {dataset}\n"
            f"- **MLflow run ids:** {ids}\n"
            f"- **Commit:** {', '.join(f'``{c}``' for c in sorted(set(commits))) or 'unknown'}\n")
    with atomic_path(path) as tmp:
        tmp.write_text(text)
