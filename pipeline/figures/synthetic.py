"""Synthetic-study figures and table, from results/synthetic/Lh=*/ only.

* ``synthetic_cosine``: the main paper's synthetic figure: cosine similarity of
  UPG and NPG with the exact gradient over k, one line per lambda, at L_h = 0.9.
* ``synthetic_solver_dynamics``: appendix Fig. 1: for each L_h, the four panels
  of §4.4, Broyden on the backward system beside the phantom gradient.
* ``synthetic_summary.md`` / ``.csv``: one row per L_h.

    python -m pipeline plot-synthetic --results results/synthetic/Lh=0.9 ... --out figures
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.figures.common import plt, save
from pipeline.io import atomic_path, read_json


def load(result_dirs: list[str | Path]) -> dict[float, dict]:
    """{L_h: {"grid", "dynamics": DataFrame, "summary": dict}} sorted by L_h."""
    out = {}
    for d in map(Path, result_dirs):
        summary = read_json(d / "summary.json")
        out[float(summary["Lh"])] = {"grid": pd.read_csv(d / "grid.csv"),
                                    "dynamics": pd.read_csv(d / "dynamics.csv"),
                                    "summary": summary}
    return dict(sorted(out.items()))


def _footer(fig, summary: dict) -> None:
    # below the axes; savefig(bbox_inches="tight") keeps it in the image
    fig.text(0.5, -0.01, f"scale: {summary['scale']} | {summary['pairs']} (u, y) pairs of "
             f"N x D = {summary.get('rows', '?')} x {summary.get('dim', '?')}, "
             f"{summary.get('dtype', '')} | exact gradient: dense solve",
             ha="center", va="top", fontsize=8, color="0.35")


def plot_cosine(study: dict, Lh: float):
    grid, summary = study["grid"], study["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    cmap = plt.get_cmap("viridis")
    lams = sorted(grid.lam.unique())
    for ax, name in zip(axes, ("upg", "npg")):
        for i, lam in enumerate(lams):
            part = grid[(grid.estimator == name) & (grid.lam == lam)].sort_values("k")
            ax.plot(part.k, part.cos_mean, marker="o", ms=3, color=cmap(i / max(1, len(lams) - 1)),
                    label=f"λ = {lam:g}")
        ax.set_title(f"{name.upper()}")
        ax.set_xlabel("unrolling steps k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine similarity with the exact ∂L/∂u")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"Phantom gradient vs exact gradient, synthetic model, L_h = {Lh:g}")
    fig.tight_layout()
    _footer(fig, summary)
    return fig


PANELS = (("objective", "‖(I − ∂F/∂h)ᵀ ĝ − ∂L/∂h‖", "log"),
          ("rel_error", "objective / ‖ĝ‖", "log"),
          ("cosine", "cos(ĝ, exact)", "linear"),
          ("l1", "‖ĝ‖₁", "log"))


def plot_dynamics(studies: dict[float, dict]):
    fig, axes = plt.subplots(len(studies), 4, figsize=(16, 3.2 * len(studies)), squeeze=False)
    for row, (Lh, study) in enumerate(studies.items()):
        dyn, summary = study["dynamics"], study["summary"]
        lam = summary["dynamics_phantom_lam"]
        for col, (key, label, scale) in enumerate(PANELS):
            ax = axes[row, col]
            for method, style in (("broyden", "-"), ("phantom", "--")):
                part = dyn[dyn.method == method].sort_values("step")
                name = "Broyden ĝ" if method == "broyden" else f"phantom (NPG, λ={lam:g}, k = step)"
                ax.plot(part.step, part[key], style, label=name)
            if key == "l1":
                ax.axhline(summary["dynamics_exact_l1_mean"], color="k", lw=0.8, ls=":",
                           label="exact g")
            ax.set_yscale(scale)
            ax.set_xlabel("step")
            ax.set_title(f"L_h = {Lh:g}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
        note = " (Broyden diverged)" if summary["dynamics_broyden_diverged"] else ""
        axes[row, 0].set_ylabel(f"L_h = {Lh:g}, ρ(∂F/∂h) ≈ {summary['dynamics_rho_dF_dh_mean']:.3f}{note}",
                                fontsize=8)
    axes[0, 3].legend(fontsize=7)
    fig.suptitle("Backward linear system: Broyden vs phantom gradient (appendix Fig. 1)")
    fig.tight_layout()
    _footer(fig, next(iter(studies.values()))["summary"])
    return fig


def summary_table(studies: dict[float, dict], k: int = 5, lam: float = 0.5) -> pd.DataFrame:
    rows = []
    for Lh, study in studies.items():
        s, grid, dyn = study["summary"], study["grid"], study["dynamics"]
        at = grid[(grid.k == k) & (grid.lam == lam)].set_index("estimator").cos_mean
        broyden = dyn[dyn.method == "broyden"].sort_values("step")
        rows.append({"L_h": Lh, "scale": s["scale"], "pairs": s["pairs"],
                     "forward_rel_residual": s["forward_rel_residual_max"],
                     "forward_steps": s["forward_steps_max"],
                     "target_met": s.get("forward_target_met"),
                     "rho_dF_dh": s["dynamics_rho_dF_dh_mean"],
                     f"cos_upg_A{k},{lam:g}": at.get("upg"), f"cos_npg_A{k},{lam:g}": at.get("npg"),
                     "broyden_final_cos": broyden.cosine.iloc[-1],
                     "broyden_diverged": s["dynamics_broyden_diverged"],
                     "seconds": s["fidelity_seconds"] + s["dynamics_seconds"]})
    return pd.DataFrame(rows)


def add_arguments(parser) -> None:
    parser.add_argument("--results", nargs="+", required=True, help="results/synthetic/Lh=* dirs")
    parser.add_argument("--out", default="figures")
    parser.add_argument("--main-Lh", type=float, default=0.9)


def main(args) -> int:
    from pipeline.io import write_csv
    out = Path(args.out)
    studies = load(args.results)
    main_Lh = args.main_Lh if args.main_Lh in studies else next(iter(studies))
    save(plot_cosine(studies[main_Lh], main_Lh), out, "synthetic_cosine")
    save(plot_dynamics(studies), out, "synthetic_solver_dynamics")
    table = summary_table(studies)
    write_csv(table, out / "synthetic_summary.csv")
    with atomic_path(out / "synthetic_summary.md") as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(table.to_string(index=False))
    return 0
