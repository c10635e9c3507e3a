"""DEQ-Transformer table and figures, from results/lm/<run>/ only (appendix §4.3).

* ``lm_table.csv`` / ``.md``: one row per run: scale, dataset, LN variant, estimator,
  f_thres, JR (weight / frequency), status (a FAILED run with its reason), test perplexity
  (at the best validation evaluation), the final training loss, the mean training step
  time, and the time ratios against ``implicit`` + JR of the same LN variant and against
  the DEQ protocol's ``implicit`` without JR at 30 / 35 (PostLN; the reference of the
  appendix's accelerations): the reference's mean step time over this run's, "reference
  failed" unless that reference finished, beside the
  paper's numbers where reference.yaml has them (UPG + JR 0.1 at f_thres 14 and 20;
  implicit + JR from the JR paper). Then one status row per claim of the appendix:
  "reproduced" when the run(s) meet the criterion written in the row, else "not
  reproduced at this scale"; "not available" when a run it needs is missing.
* ``lm_ppl_time.png``: validation perplexity against cumulative training time (the timed
  training steps, pretraining included) per run; a FAILED run ends in a cross where it was
  marked FAILED.
* ``lm_rho.png``: rho(dF/dh) at h* over training steps (the diagnostics points), and the
  adaptive run's lambda = 1/rho. Each figure's footer names the scales and the datasets.

    python -m pipeline report-lm --results results/lm/postln_upg results/lm/... --out figures/lm
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import tracking as M
from pipeline.figures.common import (ReportError, footer, load_results, plt, save,
                                      scales_datasets, scope, write_caption)
from pipeline.figures.report import paper_text, paper_values
from pipeline.io import atomic_path, write_json

REFERENCE = {"postln": "postln_implicit_jr", "preln": "preln_implicit_jr"}
# the DEQ protocol's baseline (implicit without JR, 30 / 35; PostLN only: the JR paper's
# PreLN without JR diverges): the reference of the appendix's accelerations (reference.yaml)
DEQ_BASELINE = {"postln": "postln_implicit"}
SIMILAR = 0.05       # "similar": within 5% (perplexity, training loss)
LAST_STEPS = 10      # the final training loss: mean over the last 10 steps
PAPER_NOTE = (
    "Paper (appendix §4.3, seed): DEQ-Transformer (98M, WikiText-103) with UPG + JR at weight "
    "0.1 against implicit differentiation + JR at the official settings; UPG without JR "
    "reaches a similar training loss but generalizes worse; NPG fails on PostLN unless JR or "
    "λ = 1/ρ(∂F/∂h) is used. Paper values (pipeline/figures/reference.yaml): {values}. "
    "Here the time ratio is the reference's mean training-step time over the "
    "run's, measured in the same study; the cosine is the applied gradient's (JR's included "
    "on steps that drew it) against the GMRES reference. Where the forward solve meets its "
    "tolerance before f_thres (forward steps mean / max below f_thres), f_thres does not bind "
    "and runs that differ only in it do the same work. Step times are wall-clock on the "
    "machine that ran the study, shared or not: compare ratios only from a quiet machine.")



def load(result_dirs) -> dict[str, dict]:
    out = load_results(result_dirs, lambda m: None if m.get("task") == "lm" else
                       f"is not an lm result (task {m.get('task')!r})")
    if not out:
        raise ReportError("no results")
    return out


def variant(m: dict) -> str:
    return "preln" if m["model"].get("pre_ln") else "postln"


def final_loss(run: dict) -> float | None:
    c = run["curves"]
    trained = c[c[M.PRETRAINING] == 0.0] if M.PRETRAINING in c else c
    return float(trained[M.TRAIN_LOSS].tail(LAST_STEPS).mean()) if len(trained) else None


def reference_problem(runs: dict, name: str, references: dict = REFERENCE) -> str | None:
    """Why this run has no time ratio against its reference (``REFERENCE``: implicit + JR
    of the same LN variant; ``DEQ_BASELINE``: implicit without JR), or None."""
    ref_name = references.get(variant(runs[name]["metrics"]))
    if ref_name is None:
        return "no such reference"
    ref = runs.get(ref_name)
    if ref is None:
        return "reference missing"
    return None if ref["metrics"]["status"] == "finished" else "reference failed"


def time_ratio(runs: dict, name: str, references: dict = REFERENCE) -> float | None:
    """Mean step time of the reference (same LN variant) over this run's; None unless that
    reference finished."""
    m = runs[name]["metrics"]
    if reference_problem(runs, name, references):
        return None
    ref = runs[references[variant(m)]]["metrics"]
    if not ref.get("mean_step_s") or not m.get("mean_step_s"):
        return None
    return ref["mean_step_s"] / m["mean_step_s"]


def _ratio_cell(runs: dict, name: str, references: dict = REFERENCE):
    """The table's time ratio, or why there is none."""
    ratio = time_ratio(runs, name, references)
    return ratio if ratio is not None else reference_problem(runs, name, references)


def mean_steps(run: dict) -> float:
    """The forward solver's mean steps over the estimator's steps."""
    c = run["curves"]
    trained = c[c[M.PRETRAINING] == 0.0] if M.PRETRAINING in c else c
    return float(trained[M.SOLVER_NSTEPS].mean()) if len(trained) else float("nan")


def _steps(curves: pd.DataFrame) -> str:
    """The forward solver's steps over the estimator's steps: f_thres binds only at the max."""
    trained = curves[curves[M.PRETRAINING] == 0.0] if M.PRETRAINING in curves else curves
    if not len(trained):
        return "–"
    return f"{trained[M.SOLVER_NSTEPS].mean():.1f} / {trained[M.SOLVER_NSTEPS].max():.0f}"


def table(runs: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, run in runs.items():
        m = run["metrics"]
        cfg = m.get("jacobian_reg") or {}
        failed = m["status"] == "failed"
        rows.append({
            "run": name, "scale": m["scale"], "dataset": m["dataset"], "LN": variant(m),
            "estimator": m["estimator"]
            + (f" (k={m['k']}, λ={m['lam']})" if m["estimator"] in ("upg", "npg") else "")
            + (", λ = 1/ρ" if m.get("adaptive_lam_every") else ""),
            "forward steps mean / max": _steps(run["curves"]),
            "JR weight / freq": f"{cfg.get('weight', 0):g} / {cfg.get('freq', 0):g}"
            if cfg.get("weight") else "off",
            "status": f"FAILED: {m['reason']}" if failed else m["status"],
            "test ppl": m.get("test_ppl"), "val ppl": m.get("val_ppl"),
            "train loss": final_loss(run), "step s": m.get("mean_step_s"),
            "time ratio vs implicit + JR": _ratio_cell(runs, name),
            "time ratio vs implicit 30/35": _ratio_cell(runs, name, DEQ_BASELINE),
            "cos F": (m.get("diagnostics") or {}).get("median_cos_sim_F"),
            "paper": paper_text(f"results/lm/{name}/metrics.json", default="–"),
        })
    return pd.DataFrame(rows)


def _ok(runs, *names) -> bool:
    return all(n in runs and runs[n]["metrics"]["status"] == "finished" for n in names)


def _ppl(runs, name):
    return runs[name]["metrics"].get("test_ppl")


def claims(runs: dict[str, dict]) -> pd.DataFrame:
    """One row per claim: the criterion, what was measured, the status."""
    rows = []

    def row(claim, criterion, needed, measured, holds):
        if not all(n in runs for n in needed):
            status, measured = "not available", f"missing runs: {[n for n in needed if n not in runs]}"
        else:
            status = "reproduced" if holds() else "not reproduced at this scale"
        rows.append({"claim": claim, "criterion": criterion, "measured": measured() if
                     callable(measured) else measured, "status": status})

    def faster_similar(run, ref):
        return lambda: (_ok(runs, run, ref) and (time_ratio(runs, run) or 0) > 1.0
                        and _ppl(runs, run) <= (1 + SIMILAR) * _ppl(runs, ref))

    def describe(run, ref):
        return lambda: (f"{run}: ppl {_ppl(runs, run) or float('nan'):.4g}, ratio "
                        f"{time_ratio(runs, run) or float('nan'):.3g}×; {ref}: ppl "
                        f"{_ppl(runs, ref) or float('nan'):.4g}")

    paper = {run: paper_text(f"results/lm/{run}/metrics.json", "test_ppl")
             for run in ("postln_upg_jr_f14", "postln_upg_jr_f20")}
    for run in paper:
        row(f"PostLN, UPG + JR 0.1 ({run[-3:]}): faster than implicit + JR at a similar "
            f"perplexity (paper: {paper[run]})",
            f"time ratio > 1 and test ppl ≤ {1 + SIMILAR:g} × implicit + JR's",
            [run, "postln_implicit_jr"], describe(run, "postln_implicit_jr"),
            faster_similar(run, "postln_implicit_jr"))
    row("More forward iterations (20 vs 14): lower perplexity, smaller acceleration "
        f"(paper: {paper['postln_upg_jr_f20']} vs {paper['postln_upg_jr_f14']})",
        "f20's forward solve takes more steps than f14's (f_thres binds), test ppl f20 < f14 "
        "and time ratio f20 < f14",
        ["postln_upg_jr_f14", "postln_upg_jr_f20", "postln_implicit_jr"],
        lambda: (f"f14: {_ppl(runs, 'postln_upg_jr_f14') or float('nan'):.4g}, "
                 f"{time_ratio(runs, 'postln_upg_jr_f14') or float('nan'):.3g}×, "
                 f"{mean_steps(runs['postln_upg_jr_f14']):.1f} steps; f20: "
                 f"{_ppl(runs, 'postln_upg_jr_f20') or float('nan'):.4g}, "
                 f"{time_ratio(runs, 'postln_upg_jr_f20') or float('nan'):.3g}×, "
                 f"{mean_steps(runs['postln_upg_jr_f20']):.1f} steps"),
        lambda: (_ok(runs, "postln_upg_jr_f14", "postln_upg_jr_f20", "postln_implicit_jr")
                 and mean_steps(runs["postln_upg_jr_f20"]) > mean_steps(runs["postln_upg_jr_f14"])
                 and _ppl(runs, "postln_upg_jr_f20") < _ppl(runs, "postln_upg_jr_f14")
                 and time_ratio(runs, "postln_upg_jr_f20") < time_ratio(runs, "postln_upg_jr_f14")))
    row("UPG without JR: a similar training loss, but worse generalization than UPG + JR",
        f"|train loss difference| ≤ {SIMILAR:g} × UPG + JR's (mean of the last {LAST_STEPS} "
        "steps) and test ppl above UPG + JR's",
        ["postln_upg", "postln_upg_jr_f14"],
        lambda: (f"train loss {final_loss(runs['postln_upg']):.4g} vs "
                 f"{final_loss(runs['postln_upg_jr_f14']):.4g}; test ppl "
                 f"{_ppl(runs, 'postln_upg') or float('nan'):.4g} vs "
                 f"{_ppl(runs, 'postln_upg_jr_f14') or float('nan'):.4g}"),
        lambda: (_ok(runs, "postln_upg", "postln_upg_jr_f14")
                 and abs(final_loss(runs["postln_upg"]) - final_loss(runs["postln_upg_jr_f14"]))
                 <= SIMILAR * final_loss(runs["postln_upg_jr_f14"])
                 and _ppl(runs, "postln_upg") > _ppl(runs, "postln_upg_jr_f14")))

    def status(name):
        m = runs[name]["metrics"]
        return f"{name}: {m['status']}" + (f" ({m['reason']})" if m["reason"] else "")

    row("NPG fails on PostLN without JR or adaptive damping", "postln_npg FAILED",
        ["postln_npg"], lambda: status("postln_npg"),
        lambda: runs["postln_npg"]["metrics"]["status"] == "failed")
    for run, what in (("postln_npg_adaptive", "adaptive damping λ = 1/ρ(∂F/∂h)"),
                      ("postln_npg_jr", "JR")):
        row(f"NPG on PostLN trains with {what} where it fails without",
            f"postln_npg FAILED and {run} finished", ["postln_npg", run],
            lambda run=run: f"{status('postln_npg')}; {status(run)}",
            lambda run=run: (runs["postln_npg"]["metrics"]["status"] == "failed"
                             and _ok(runs, run)))
    row("PreLN, UPG + JR 0.1 (f14): faster than implicit + JR at a similar perplexity",
        f"time ratio > 1 and test ppl ≤ {1 + SIMILAR:g} × implicit + JR's",
        ["preln_upg_jr_f14", "preln_implicit_jr"], describe("preln_upg_jr_f14", "preln_implicit_jr"),
        faster_similar("preln_upg_jr_f14", "preln_implicit_jr"))
    return pd.DataFrame(rows)


def header(runs: dict[str, dict]) -> str:
    metrics = [r["metrics"] for r in runs.values()]
    params = {m.get("trainable_params") for m in metrics}
    return (f"# DEQ-Transformer with UPG + Jacobian regularization (appendix §4.3)\n\n"
            f"{scope(metrics)}; parameters: "
            f"{', '.join(f'{p:,}' for p in sorted(p for p in params if p))}; steps: "
            f"{max(m['steps'] for m in metrics)}")


def _wall(curves: pd.DataFrame) -> pd.Series:
    """Cumulative timed training seconds after each step (untimed steps count 0)."""
    return curves.get(M.TIME_STEP, pd.Series(0.0, index=curves.index)).fillna(0.0).cumsum()


def plot_ppl_time(runs):
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        m, c = run["metrics"], run["curves"]
        wall = dict(zip(c["step"], _wall(c)))
        hist = [h for h in m["history"] if h["step"] >= 1]
        xs = [wall.get(h["step"] - 1, float("nan")) for h in hist]
        line, = ax.plot(xs, [h["val_ppl"] for h in hist], marker="o", ms=3, lw=1,
                        ls="-" if variant(m) == "postln" else "--", label=name)
        if m["status"] == "failed":
            x_end = float(_wall(c).iloc[-1]) if len(c) else 0.0
            y_end = hist[-1]["val_ppl"] if hist else float("nan")
            ax.plot([x_end], [y_end], "x", ms=10, mew=2, color=line.get_color())
            ax.annotate("FAILED", (x_end, y_end), fontsize=7, color=line.get_color())
    ax.set_xlabel("training time, s (timed steps, cumulative)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title("perplexity against wall time")
    ax.legend(fontsize=6, ncol=2)
    footer(fig, f"DEQ-Transformer — {scope(r['metrics'] for r in runs.values())}")
    return fig


def plot_rho(runs):
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        m, c = run["metrics"], run["curves"]
        d = c.dropna(subset=[M.RHO]) if M.RHO in c else c.iloc[0:0]
        line = None
        if len(d):
            line, = ax.plot(d["step"], d[M.RHO], "o-", ms=3, lw=1, label=f"{name} ρ(∂F/∂h)")
        if m.get("adaptive_lam_every") and M.TRAIN_LAM in c:
            lam = c.dropna(subset=[M.TRAIN_LAM])
            ax.plot(lam["step"], lam[M.TRAIN_LAM], ":", lw=1,
                    color=line.get_color() if line else None, label=f"{name} λ = 1/ρ")
        if m["status"] == "failed" and len(c):
            ax.axvline(c["step"].iloc[-1], lw=0.8, ls="--",
                       color=line.get_color() if line else "grey")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("spectral radius at h* (power method)")
    ax.set_title("ρ over training (dashed: where a run was marked FAILED)")
    ax.legend(fontsize=6, ncol=2)
    footer(fig, f"DEQ-Transformer — {scope(r['metrics'] for r in runs.values())}")
    return fig


def add_arguments(parser) -> None:
    parser.add_argument("--results", nargs="+", required=True, help="results/lm/<run> folders")
    parser.add_argument("--out", required=True, help="figures/lm")


def main(args) -> int:
    from pipeline.io import write_csv
    runs = load(args.results)
    out = Path(args.out)
    frame, claim_rows = table(runs), claims(runs)
    write_csv(frame, out / "lm_table.csv")
    with atomic_path(out / "lm_table.md") as tmp:
        tmp.write_text(f"{header(runs)}\n\n{frame.to_markdown(index=False, floatfmt='.4g')}\n\n"
                       f"## Claims\n\n{claim_rows.to_markdown(index=False)}\n\n"
                       f"{PAPER_NOTE.format(values=paper_values('lm'))}\n")
    save(plot_ppl_time(runs), out, "lm_ppl_time")
    save(plot_rho(runs), out, "lm_rho")
    metrics = [r["metrics"] for r in runs.values()]
    scale, dataset = scales_datasets(metrics)
    write_caption(out / "lm_caption.rst", what=header(runs),
                  scale=scale, dataset=dataset,
                  run_ids=[m["mlflow_run_id"] for m in metrics if m.get("mlflow_run_id")],
                  commits=[m["git_commit"] for m in metrics])
    write_json({"runs": {name: {"status": r["metrics"]["status"],
                                "test_ppl": r["metrics"].get("test_ppl"),
                                "time_ratio": time_ratio(runs, name)}
                         for name, r in runs.items()},
                "claims": {c["claim"]: c["status"] for c in claim_rows.to_dict("records")}},
               out / "lm_metrics.json")
    print(f"wrote {out}/lm_table.md and 2 figures")
    return 0
