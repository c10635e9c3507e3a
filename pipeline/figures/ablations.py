"""Ablation table and training figures, from results/ablations/<name>/ only.

* ``ablations_table.csv`` / ``.md``: one row per ablation: scale, dataset, status,
  accuracy (best and final epoch); the diagnostics-free time per step and its ratio to
  the matching implicit run (same optimizer and dropout); the backward time from h* to the
  parameter gradients, repeat-timed side by side with implicit differentiation on the
  same batch and h*; the peak tensor memory of a training step; and the gradient's
  cosine with the reference over F's parameters, with the reference residual reached
  and the fraction of diagnostics whose reference converged. Beside the paper's numbers
  where they exist; the header names the scale and the dataset.
* ``ablations_training.png`` / ``.pdf``: training loss, test accuracy, the cosine of
  the applied gradient with the reference over F's parameters (only where the
  reference met its tolerance; hollow where the forward residual at h* missed f_tol),
  rho(dF/dh) and rho(dF_lam/dh).

A figure whose cosine panel has no converged reference point is an error, not a pass.

    python -m pipeline report-ablations --results results/ablations/mdeq ... --out figures/ablations
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import tracking as M
from pipeline.figures.common import (ReportError, load_results, plt, save, scales_datasets,
                                      scope, write_caption)
from pipeline.figures.report import paper_text
from pipeline.io import atomic_path, write_json

COS_F = M.GRAD_COS_PART.format(part="F")

# The columns, below the table; the paper's values come from reference.yaml (paper_text).
COLUMN_NOTE = (
    "Paper values: pipeline/figures/reference.yaml (\"not available\": the paper's ablation "
    "table could not be read). Backward speedup: the time from h* to the parameter gradients, "
    "median of repeats after a warm-up, alternating with implicit differentiation (the run's "
    "b_thres) on the same batch and h*; implicit converged: the share of those implicit "
    "solves that met b_tol within b_thres (the speedup is against the paper's budget, "
    "converged or not). "
    "cos F: cosine of the applied gradient with the exact implicit gradient at the h* the "
    "forward solver found (GMRES per sample, float64), over F's parameters, median over the "
    "diagnostics whose reference converged; ref residual: the worst per-sample relative "
    "residual of that reference (median over diagnostics).")



def load(result_dirs: list[str | Path]) -> dict[str, dict]:
    return load_results(result_dirs, lambda m: None if "diagnostics" in m else
                        "predates the shared training loop; rerun it")


def matching_implicit(name: str, runs: dict[str, dict]) -> str | None:
    """The implicit run with this run's optimizer and dropout: its training-time reference."""
    m = runs[name]["metrics"]
    if m["estimator"] == "implicit":
        return None
    for other, run in runs.items():
        o = run["metrics"]
        if (o["estimator"] == "implicit" and o["optimizer"] == m["optimizer"]
                and o["model"].get("dropout") == m["model"].get("dropout")
                and o["status"] == "finished"):
            return other
    return None


def table(runs: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, run in runs.items():
        m, d = run["metrics"], run["metrics"]["diagnostics"]
        est = m["estimator"] + (f" A{m['k']},{m['lam']:g}" if m["estimator"] in ("upg", "npg") else "")
        ref = matching_implicit(name, runs)
        ratio = None
        if ref and m["mean_step_s"] and runs[ref]["metrics"]["mean_step_s"]:
            ratio = runs[ref]["metrics"]["mean_step_s"] / m["mean_step_s"]
        rows.append({
            "ablation": name, "scale": m["scale"], "dataset": m["dataset"],
            "status": m["status"] if m["status"] == "finished" else f"FAILED: {m['reason']}",
            "estimator": est, "optimizer": m["optimizer"],
            "pretrain_steps": m["pretrain_steps"], "dropout": m["model"].get("dropout"),
            "best_acc_%": _pct(m["best"]), "final_acc_%": _pct(m["final"]),
            "paper_acc_%": paper_text(f"results/ablations/{name}/metrics.json", "best"),
            "epochs": f"{m['epochs_completed']}/{m['epochs']}",
            "step_s": m["mean_step_s"],
            "train_speedup_vs_implicit": ratio, "implicit_run": ref or "",
            "grad_s": d["median_grad_s"], "grad_implicit_s": d["median_grad_implicit_s"],
            "backward_speedup_vs_implicit": d["median_grad_speedup_vs_implicit"],
            "implicit_converged": (f"{d['implicit_converged_fraction']:.0%} of {d['count']}"
                                   if d.get("implicit_converged_fraction") is not None
                                   else "no diagnostics"),
            "paper_backward_speedup": paper_text(
                f"results/ablations/{name}/metrics.json",
                "diagnostics.median_grad_speedup_vs_implicit"),
            "step_peak_mb": m["peak_memory_mb"],
            "cos_F": d["median_cos_sim_F"], "cos_all": d["median_cos_sim"],
            "ref_residual": d["median_ref_rel_residual"],
            "ref_converged": (f"{d['ref_converged_fraction']:.0%} of {d['count']}"
                              if d["count"] else "no diagnostics"),
        })
    return pd.DataFrame(rows)


def _pct(x):
    return None if x is None else round(100 * x, 2)


def header(runs: dict[str, dict]) -> str:
    m = next(iter(runs.values()))["metrics"]
    return (f"MDEQ-Tiny ablations — {scope(r['metrics'] for r in runs.values())}; "
            f"{m['trainable_params']:,} trainable parameters; epochs {m['epochs']}")


def plot_training(runs: dict[str, dict]):
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    converged_points = 0
    for name, run in runs.items():
        c, m = run["curves"], run["metrics"]
        if c.empty:
            continue
        loss = c[M.TRAIN_LOSS].rolling(10, min_periods=1).mean()
        line, = axes[0].plot(c.step, loss, label=name)
        color = line.get_color()
        hist = pd.DataFrame([h for h in m["history"] if "epoch_s" in h])
        if not hist.empty:
            axes[1].plot(hist.epoch, 100 * hist[m["primary_metric"]], marker="o", color=color)
        if M.GRAD_REF_CONVERGED not in c:
            continue
        d = c[c[M.GRAD_REF_CONVERGED] == 1.0]
        converged_points += len(d)
        tight = d[d[M.FORWARD_CONVERGED] == 1.0]
        loose = d[d[M.FORWARD_CONVERGED] != 1.0]
        axes[2].plot(d.step, d[COS_F], color=color, alpha=0.5)
        axes[2].scatter(tight.step, tight[COS_F], color=color, s=18)
        axes[2].scatter(loose.step, loose[COS_F], facecolors="none", edgecolors=color, s=18)
        diag = c.dropna(subset=[M.RHO])
        axes[3].plot(diag.step, diag[M.RHO], marker=".", color=color)
        axes[3].plot(diag.step, diag[M.RHO_LAMBDA], ls="--", color=color)
    if converged_points == 0:
        raise ReportError("no diagnostics point has a converged reference: the cosine panel "
                          "would be empty (see grad/ref_rel_residual in the curves)")
    titles = ("training loss (10-step mean)", "test accuracy (%)",
              "cos(applied, exact at the found h*), F's params\n"
              "converged references only; hollow: forward residual > f_tol",
              "ρ(∂F/∂h) solid, ρ(∂F_λ/∂h) dashed")
    for ax, title, xlabel in zip(axes, titles, ("step", "epoch", "step", "step")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(header(runs), fontsize=10)
    fig.tight_layout()
    return fig


def test_time_text(runs: dict[str, dict]) -> str:
    """The runs evaluated with test-time unrolling (appendix §2): per setting, the metric and
    the evaluation time (pipeline/experiments/test_time.py); "" where none was."""
    parts = []
    for name, run in runs.items():
        tt = run["metrics"].get("test_time")
        if not tt:
            continue
        frame = pd.DataFrame(tt["settings"]).drop(columns=["unroll", "f_max_iter"])
        se = f"{tt['two_se']:.3g}" if tt["two_se"] is not None else "n/a"
        parts.append(f"\nTest-time unrolling, {name} (k = {tt['k']}, λ = {tt['lam']:g}, "
                     f"{tt['count']} test samples; 2 binomial SE = {se}; decay without the "
                     f"unrolling {tt['decay_without_unrolling']:.3g}, gain from 2k "
                     f"{tt['gain_from_2k']:.3g}):\n\n"
                     f"{frame.to_markdown(index=False, floatfmt='.4g')}\n")
    return "".join(parts)


def add_arguments(parser) -> None:
    parser.add_argument("--results", nargs="+", required=True)
    parser.add_argument("--out", default="figures")


def main(args) -> int:
    from pipeline.io import write_csv
    runs = load(args.results)
    out = Path(args.out)
    fig = plot_training(runs)  # first: an untrustworthy figure writes nothing
    frame = table(runs)
    write_csv(frame, out / "ablations_table.csv")
    with atomic_path(out / "ablations_table.md") as tmp:
        tmp.write_text(f"{header(runs)}\n\n{frame.to_markdown(index=False, floatfmt='.4g')}\n\n"
                       f"{COLUMN_NOTE}\n{test_time_text(runs)}")
    save(fig, out, "ablations_training")
    metrics = [r["metrics"] for r in runs.values()]
    scale, dataset = scales_datasets(metrics)
    write_caption(out / "ablations_caption.rst", what=header(runs),
                  scale=scale, dataset=dataset,
                  run_ids=[m["mlflow_run_id"] for m in metrics if m.get("mlflow_run_id")],
                  commits=[m["git_commit"] for m in metrics])
    # the study's summary metrics, for `dvc metrics show` / `dvc exp show`
    write_json({m["name"]: {"status": m["status"], "best": m["best"], "final": m["final"],
                            "backward_speedup_vs_implicit":
                                m["diagnostics"]["median_grad_speedup_vs_implicit"]}
                for m in metrics}, out / "ablations_metrics.json")
    print(header(runs))
    print(frame.to_string(index=False))
    return 0
