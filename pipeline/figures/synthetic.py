"""Synthetic-study figures and table, from results/synthetic/Lh=*/ only.

* ``synthetic_cosine``: the main paper's synthetic figure: cosine similarity of
  UPG and NPG with the exact gradient over k, one line per lambda, at L_h = 0.9.
* ``synthetic_solver_dynamics``: appendix Fig. 1: for each L_h, the four panels
  of §4.4, Broyden on the backward system beside the phantom gradient; the median
  over (W seed, pair) with the range over them as a band, and how many W seeds showed
  each behaviour.
* ``synthetic_summary.md`` / ``.csv``: one row per L_h.

    python -m pipeline plot-synthetic --results results/synthetic/Lh=0.9 ... --out figures
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.figures.common import footer, plt, save, write_caption
from pipeline.io import atomic_path, read_json, write_json

LAYOUT_TEXT = {"per_pair": "one Broyden per (u, y) pair on its N x D vector (per_pair)",
               "joint": "one Broyden over all pairs at once (joint)"}


def load(result_dirs: list[str | Path]) -> dict[float, dict]:
    """{L_h: {"grid", "dynamics", "pairs": DataFrame, "summary": dict}} sorted by L_h."""
    out = {}
    for d in map(Path, result_dirs):
        summary = read_json(d / "summary.json")
        out[float(summary["Lh"])] = {"grid": pd.read_csv(d / "grid.csv"),
                                    "dynamics": pd.read_csv(d / "dynamics.csv"),
                                    "pairs": pd.read_csv(d / "pairs.csv"),
                                    "summary": summary}
    return dict(sorted(out.items()))


def _footer(fig, summary: dict, dynamics: bool = False) -> None:
    s = summary
    lines = [f"scale: {s['scale']} | {s['pairs']} (u, y) pairs of N x D = {s['rows']} x "
             f"{s['dim']}, {s['dtype']} on {s['device']} | u ~ N(0, {s['u_scale']:g}²), "
             f"W: {s['weight']} (||W||₂ = L_h) | exact gradient: dense float64 solve of "
             f"(I − ∂F/∂h)ᵀ g = ∂L/∂h at the h* reached by {s['forward_steps_max']} "
             f"fixed-point iterations"]
    if dynamics:
        lines.append(f"{s['dynamics_pairs_per_seed']} pairs x {len(s['dynamics_seeds'])} W "
                     f"seeds {s['dynamics_seeds']}: line = median, band = range over them | "
                     f"backward solver: {s['dynamics_solver']}, "
                     f"{LAYOUT_TEXT[s['dynamics_layout']]}; phantom: NPG iterate with "
                     f"k = step, λ = {s['dynamics_phantom_lam']:g}")
    footer(fig, "\n".join(lines))


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
    axes[0].set_ylabel("cos(estimate, exact ∂L/∂u), mean over pairs")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"Phantom gradient vs exact gradient, synthetic model, L_h = {Lh:g} "
                 f"(forward residual ≤ {summary['forward_rel_residual_max']:.1e}, "
                 f"ρ(∂F/∂h) ≥ {summary['dynamics_rho_dF_dh_min']:.4f})")
    fig.tight_layout()
    _footer(fig, summary)
    return fig


PANELS = (("objective", "‖(I − ∂F/∂h)ᵀ ĝ − ∂L/∂h‖", "log"),
          ("rel_error", "objective / ‖ĝ‖", "log"),
          ("cosine", "cos(ĝ, exact)", "linear"),
          ("l1", "‖ĝ‖₁", "log"))
STYLE = {"broyden": ("C0", "-", "Broyden ĝ"), "gmres": ("C2", ":", "GMRES ĝ (same dtype, budget)"),
         "phantom": ("C1", "--", "phantom (NPG, k = step)")}


def behaviour_text(summary: dict) -> str:
    """How many W seeds showed each behaviour (pipeline.experiments.synthetic.seed_behaviours)."""
    lines = []
    for method in STYLE:
        if method not in summary["dynamics_behaviours"]:
            continue  # results from before GMRES joined the dynamics
        b = summary["dynamics_behaviours"][method]
        n = b["seeds"]
        lines.append(f"{method}, W seeds of {n}:\n"
                     f"  final < 1e-6 x start: {b['converged']}\n"
                     f"  min > 1e-3 x start: {b['stalled']}\n"
                     f"  a pair ended above start: {b['ended_above_start']}\n"
                     f"  cosine not monotone: {b['cosine_not_monotone']}\n"
                     f"  ‖ĝ‖₁ > 3 x exact: {b['l1_blowup']}")
    return "\n".join(lines)


def plot_dynamics(studies: dict[float, dict]):
    fig, axes = plt.subplots(len(studies), 4, figsize=(17, 3.3 * len(studies)), squeeze=False)
    for row, (Lh, study) in enumerate(studies.items()):
        dyn, summary = study["dynamics"], study["summary"]
        for col, (key, label, scale) in enumerate(PANELS):
            ax = axes[row, col]
            for method, (color, ls, name) in STYLE.items():
                part = dyn[dyn.method == method]
                values = part[key].where(part[key] > 0) if scale == "log" else part[key]
                by_step = values.groupby(part.step)
                ax.fill_between(by_step.min().index, by_step.min(), by_step.max(), color=color,
                                alpha=0.18, lw=0)
                ax.plot(by_step.median().index, by_step.median(), ls, color=color, label=name)
            if key == "l1":
                ax.axhline(summary["dynamics_exact_l1_median"], color="k", lw=0.8, ls=":",
                           label="exact g (median)")
            ax.set_yscale(scale)
            ax.set_xlabel("step")
            ax.set_title(f"L_h = {Lh:g}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel(
            f"L_h = {Lh:g}\nρ(∂F/∂h) at h*: {summary['dynamics_rho_dF_dh_min']:.4f}–"
            f"{summary['dynamics_rho_dF_dh_max']:.4f}\nforward residual ≤ "
            f"{summary['dynamics_forward_rel_residual_max']:.1e}", fontsize=8)
        axes[row, 3].text(1.04, 0.5, behaviour_text(summary), transform=axes[row, 3].transAxes,
                          va="center", ha="left", fontsize=7, family="monospace")
    axes[0, 3].legend(fontsize=7, loc="upper left")
    fig.suptitle("Backward linear system: Broyden and GMRES (same dtype and budget) vs the "
                 "phantom gradient (appendix Fig. 1)")
    fig.tight_layout()
    _footer(fig, next(iter(studies.values()))["summary"], dynamics=True)
    return fig


def summary_table(studies: dict[float, dict], k: int = 5, lam: float = 0.5) -> pd.DataFrame:
    """One row per L_h: the conditioning reached, the forward residual, and the outcomes of
    Broyden and the phantom gradient on the backward system (objectives / start)."""
    rows = []
    for Lh, study in studies.items():
        s, grid = study["summary"], study["grid"]
        at = grid[(grid.k == k) & np.isclose(grid.lam, lam)].set_index("estimator").cos_mean
        b, p = s["dynamics_broyden"], s["dynamics_phantom"]
        rows.append({"L_h": Lh, "scale": s["scale"], "pairs": s["pairs"],
                     "W_seeds": len(s["dynamics_seeds"]),
                     "rho_min": s["dynamics_rho_dF_dh_min"],
                     "rho_median": s["dynamics_rho_dF_dh_median"],
                     "forward_rel_residual": s["forward_rel_residual_max"],
                     "forward_target_met": s["forward_target_met"],
                     "broyden_min_obj_median": b["min_objective_rel_median"],
                     "broyden_min_obj_lowest": b["min_objective_rel_lowest"],
                     "broyden_final_obj_median": b["final_objective_rel_median"],
                     "broyden_final_obj_highest": b["final_objective_rel_highest"],
                     "broyden_pairs_above_start": f"{b['pairs_above_start']}/{b['pairs']}",
                     "broyden_max_l1_over_exact": b["max_l1_over_exact"],
                     "broyden_cos_sign_changes_median": b["cos_sign_changes_median"],
                     "phantom_max_l1_over_exact": p["max_l1_over_exact"],
                     f"cos_upg_A{k},{lam:g}": at.get("upg"), f"cos_npg_A{k},{lam:g}": at.get("npg"),
                     "seconds": s["grid_seconds"] + s["dynamics_seconds"]})
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
    notes = ("objectives are ||(I - dF/dh)^T g - dL/dh|| over its start (g = 0); min and final "
             "over the steps of each (W seed, pair), then the median or the extreme over them. "
             "rho is rho(dF/dh) at the h* reached (exact eigen-solve), forward_rel_residual the "
             "largest ||h - F(h)|| / ||h|| over pairs.")
    with atomic_path(out / "synthetic_summary.md") as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n\n" + notes + "\n")
    summaries = [st["summary"] for st in studies.values()]
    write_caption(out / "synthetic_caption.rst",
                  what=f"Synthetic spectral-normalised study, L_h in "
                       f"{', '.join(f'{Lh:g}' for Lh in studies)}.",
                  scale=", ".join(sorted({str(m.get("scale")) for m in summaries})),
                  dataset="synthetic (u, y) pairs, generated in code",
                  run_ids=[m["mlflow_run_id"] for m in summaries if m.get("mlflow_run_id")],
                  commits=[m.get("git_commit", "unknown") for m in summaries])
    write_json({f"Lh={Lh:g}": {"rho": st["summary"].get("dynamics_rho_dF_dh_min"),
                               "forward_rel_residual": st["summary"].get("forward_rel_residual_max"),
                               "broyden_min_objective_rel":
                                   st["summary"]["dynamics_broyden"]["min_objective_rel_median"],
                               "broyden_final_objective_rel":
                                   st["summary"]["dynamics_broyden"]["final_objective_rel_median"]}
                for Lh, st in studies.items()}, out / "synthetic_metrics.json")
    print(table.to_string(index=False))
    return 0
