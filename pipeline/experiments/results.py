"""What a training run reports: its rows and evaluations logged to the tracker, and the
results summary that ``metrics.json`` holds."""
from __future__ import annotations

import statistics

from pipeline import tracking as M
from pipeline.experiments.train_config import TrainConfig


def log_new_rows(tracker, state: dict, metric: str) -> None:
    """Log the step rows and evaluations that MLflow does not have yet (batched)."""
    rows = state["curves"][state["logged_rows"]:]
    if rows:
        keys = sorted({k for row in rows for k in row if k != "step"})
        tracker.log_curves({k: [row.get(k, float("nan")) for row in rows] for k in keys},
                           [row["step"] for row in rows])
    for entry in state["history"][state["logged_evals"]:]:
        out = {M.eval_metric(k): v for k, v in entry.items()
               if k not in ("epoch", "step", "best", "epoch_s")}
        out[M.best_eval_metric(metric)] = entry["best"]
        if "epoch_s" in entry:
            out[M.TIME_EPOCH] = entry["epoch_s"]
        tracker.log_metrics(out, step=entry["step"])
    state["logged_rows"], state["logged_evals"] = len(state["curves"]), len(state["history"])


def catch_up(tracker, state: dict, metric: str) -> None:
    """After a resume: rows are logged right after each checkpoint, so a kill in between
    leaves MLflow behind the checkpoint. Ask the tracker what it has, and log the rest once."""
    last_row = tracker.last_step(M.TRAIN_LOSS)
    last_eval = tracker.last_step(M.eval_metric(metric))
    state["logged_rows"] = sum(1 for r in state["curves"]
                               if last_row is not None and r["step"] <= last_row)
    state["logged_evals"] = sum(1 for h in state["history"]
                                if last_eval is not None and h["step"] <= last_eval)
    log_new_rows(tracker, state, metric)


def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else None


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize(cfg: TrainConfig, task, state: dict, status: str, reason: str, n_params: int
              ) -> dict:
    """The results of a run (``metrics.json``, less what the job adds): status and reason,
    best and final evaluation, mean step times, peak memory, the diagnostics' medians, a
    task's own keys, and the history and step rows."""
    hist, metric = state["history"], task.primary_metric
    trained = [r for r in state["curves"] if not r[M.PRETRAINING]]  # the estimator's steps
    timed = [r for r in trained if M.TIME_STEP in r]

    def mean(key):
        return sum(r[key] for r in timed) / len(timed) if timed else None

    diags = [r for r in trained if M.GRAD_REF_CONVERGED in r]
    good = [r for r in diags if r[M.GRAD_REF_CONVERGED] == 1.0]
    epochs = [h for h in hist if "epoch_s" in h]
    return {
        "status": status, "reason": reason, "git_commit": M.git_commit(), "task": cfg.task,
        "dataset": task.dataset, "model": cfg.model, "estimator": cfg.estimator, "k": cfg.k,
        "lam": cfg.lam, "pretrain_steps": cfg.pretrain_steps, "optimizer": cfg.optimizer,
        "epochs_completed": state["epoch"], "epochs": cfg.epochs, "steps": state["step"],
        "primary_metric": metric, "eval_split": task.eval_split,
        "best": state["best"], "best_step": state["best_step"], "best_epoch": state["best_epoch"],
        "final": hist[-1][metric] if hist else None,
        "time_per_epoch_s": sum(h["epoch_s"] for h in epochs) / len(epochs) if epochs else None,
        "peak_memory_mb": max((r[M.MEMORY_STEP_PEAK] for r in trained
                               if M.MEMORY_STEP_PEAK in r), default=None),
        "mean_forward_s": mean(M.TIME_FORWARD), "mean_backward_s": mean(M.TIME_BACKWARD),
        "mean_step_s": mean(M.TIME_STEP), "trainable_params": n_params,
        "diagnostics": {
            "count": len(diags),
            "reference": "implicit gradient at the recorded h*, GMRES per sample, float64, "
                         f"tol {cfg.reference_tol:g}, restart {cfg.reference_restart}",
            "ref_converged_fraction": len(good) / len(diags) if diags else None,
            "median_ref_rel_residual": _median([r[M.GRAD_REF_REL_RESIDUAL] for r in diags]),
            "max_ref_rel_residual": max((r[M.GRAD_REF_REL_RESIDUAL] for r in diags), default=None),
            "median_cos_sim": _median([r[M.GRAD_COS] for r in good]),
            "median_cos_sim_F": _median([r.get(M.GRAD_COS_PART.format(part="F"), float("nan"))
                                         for r in good]),
            "median_forward_rel_residual": _median([r[M.SOLVER_REL_RESIDUAL] for r in diags]),
            "median_grad_s": _median([r.get(M.TIME_GRAD, float("nan")) for r in diags]),
            "median_grad_implicit_s": _median([r.get(M.TIME_GRAD_IMPLICIT, float("nan"))
                                               for r in diags]),
            "median_grad_speedup_vs_implicit": _median([r.get(M.GRAD_SPEEDUP, float("nan"))
                                                        for r in diags]),
            "speedup_reference": "implicit differentiation with the run's backward solver "
                                 f"({cfg.b_solver}, b_max_iter {cfg.b_max_iter}, tol {cfg.b_tol:g}), "
                                 "timed from the recorded h*",
            "implicit_converged_fraction": _mean([r[M.GRAD_IMPLICIT_CONVERGED] for r in diags
                                                  if M.GRAD_IMPLICIT_CONVERGED in r]),
            "median_implicit_rel_residual": _median([r.get(M.GRAD_IMPLICIT_REL_RESIDUAL,
                                                           float("nan")) for r in diags]),
            "median_diagnostics_s": _median([r[M.TIME_DIAGNOSTICS] for r in diags]),
        },
        "jacobian_reg": cfg.jacobian_reg, "adaptive_lam_every": cfg.adaptive_lam_every,
        **(task.summary(hist) if hasattr(task, "summary") else {}),  # a task's own keys
        "history": hist, "curves": state["curves"],
    }

