"""Large-scale vision tables and figures (appendix §4.3), from results/vision/<run>/ only.

* ``vision_table.csv`` / ``.md``: one row per run, naming the scale and the dataset it was
  trained on: the setting (model preset, estimator, pretraining, ranks), our best
  top-1 accuracy (%) and the top-5 of that evaluation, the time per step, rho(dF/dh) and
  rho(dF_lam/dh) after training on validation batches, and beside them the paper's value
  where reference.yaml has one (CIFAR-10 large UPG: the official training logs; ImageNet
  MDEQ-Small: the appendix; none for the implicit baselines). A reference is for the
  paper's dataset at the paper's scale: a run on another dataset (the digits stand-ins of
  the default scale) is marked not comparable, whatever its number.
* ``vision_training.png``: training loss per step, one line per run, and rho / rho_lambda
  per run; its footer names the scales and the datasets of the runs.

    python -m pipeline report-vision --results results/vision/cifar10_large_upg ... --out figures/vision
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import tracking as M
from pipeline.figures.common import (footer, load_results, plt, save, scales_datasets, scope,
                                      write_caption)
from pipeline.figures.report import paper_text
from pipeline.io import atomic_path, write_json

# The paper dataset of a run, by its name's prefix: a paper value (reference.yaml, the claim
# that reads the run's result) is shown only for a run on it at the paper scale.
PAPER_DATASET = {"cifar10": "cifar10", "imagenet": "imagenet"}
NOT_AVAILABLE = "not available"



def load(result_dirs) -> dict[str, dict]:
    return load_results(result_dirs, lambda m: None if m.get("study") == "vision" else
                        f"is not a vision result (study {m.get('study')!r})")


def reference(name: str, dataset: str, scale: str) -> str:
    """The paper's value for a run (reference.yaml), or why there is none to compare with."""
    paper = paper_text(f"results/vision/{name}/metrics.json", "best", default=NOT_AVAILABLE)
    wanted = PAPER_DATASET.get(name.split("_")[0])
    if paper == NOT_AVAILABLE or wanted is None:
        return NOT_AVAILABLE
    if dataset != wanted or scale != "paper":
        return f"not comparable ({dataset} at scale {scale}; the paper: {wanted} at scale paper)"
    return paper


def _pct(value) -> float | None:
    return None if value is None else round(100 * value, 2)


def table(runs: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, run in runs.items():
        m = run["metrics"]
        model = m["model"]
        # top-5 at the evaluation that gave the best top-1
        at_best = next((h for h in m["history"] if h["step"] == m["best_step"]), {})
        spectral = m.get("spectral") or {}
        paper = reference(name, m["dataset"], m["scale"])
        rows.append({
            "run": name, "scale": m["scale"], "dataset": m["dataset"],
            "model": model.get("preset", "tiny") + (f" channels {model['channels']}"
                                                     if "channels" in model else ""),
            "estimator": m["estimator"] + (f" k={m['k']} λ={m['lam']}" if m["estimator"] in
                                           ("upg", "npg") else ""),
            "pretrain_steps": m["pretrain_steps"], "ranks": m.get("world_size", 1),
            "steps": m["steps"], "status": m["status"] + (f": {m['reason']}" if m["reason"] else ""),
            "top1_pct": _pct(m["best"]), "top5_pct": _pct(at_best.get("top5")),
            "mean_step_s": m["mean_step_s"],
            "rho": spectral.get("rho"), "rho_lambda": spectral.get("rho_lambda"),
            "paper": paper})
    return pd.DataFrame(rows)


def header(runs: dict[str, dict]) -> str:
    scales, datasets = scales_datasets(r["metrics"] for r in runs.values())
    return (f"MDEQ (large) on CIFAR-10-style and MDEQ-Small on ImageNet-style data (appendix §4.3): "
            f"best top-1 / top-5 accuracy (%) per run, rho(dF/dh) and rho(dF_lam/dh) on "
            f"validation batches after training. Scale: {scales}. Datasets: {datasets}.")


def plot_training(runs: dict[str, dict]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(runs)
    for name in names:
        c = runs[name]["curves"]
        axes[0].plot(c["step"], c[M.TRAIN_LOSS], lw=0.8, label=name)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=6)
    spectral = [(n, runs[n]["metrics"].get("spectral")) for n in names]
    spectral = [(n, s) for n, s in spectral if s]
    xs = range(len(spectral))
    axes[1].bar([x - 0.2 for x in xs], [s["rho"] for _, s in spectral], 0.4, label="ρ(∂F/∂h)")
    axes[1].bar([x + 0.2 for x in xs], [s["rho_lambda"] for _, s in spectral], 0.4,
                label="ρ(∂F_λ/∂h)")
    axes[1].axhline(1.0, color="k", lw=0.6, ls="--")
    axes[1].set_xticks(list(xs), [n for n, _ in spectral], rotation=30, ha="right", fontsize=6)
    axes[1].set_ylabel("spectral radius at h* (validation, mean)")
    axes[1].legend(fontsize=6)
    footer(fig, f"MDEQ vision runs — {scope(runs[n]['metrics'] for n in names)}")
    return fig


def add_arguments(parser) -> None:
    parser.add_argument("--results", nargs="+", required=True, help="results/vision/<run> folders")
    parser.add_argument("--out", required=True, help="figures/vision")


def main(args) -> int:
    from pipeline.io import write_csv
    runs = load(args.results)
    out = Path(args.out)
    frame = table(runs)
    write_csv(frame, out / "vision_table.csv")
    with atomic_path(out / "vision_table.md") as tmp:
        tmp.write_text(f"{header(runs)}\n\n{frame.to_markdown(index=False, floatfmt='.4g')}\n")
    save(plot_training(runs), out, "vision_training")
    metrics = [r["metrics"] for r in runs.values()]
    scale, dataset = scales_datasets(metrics)
    write_caption(out / "vision_caption.rst", what=header(runs),
                  scale=scale, dataset=dataset,
                  run_ids=[m["mlflow_run_id"] for m in metrics if m.get("mlflow_run_id")],
                  commits=[m["git_commit"] for m in metrics])
    write_json({name: {"status": r["metrics"]["status"], "best": r["metrics"]["best"],
                       "rho": (r["metrics"].get("spectral") or {}).get("rho"),
                       "rho_lambda": (r["metrics"].get("spectral") or {}).get("rho_lambda")}
                for name, r in runs.items()}, out / "vision_metrics.json")
    print(f"wrote {out}/vision_table.md and vision_training.png")
    return 0
