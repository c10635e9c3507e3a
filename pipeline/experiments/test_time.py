"""Test-time unrolling on a trained model (appendix §2).

"For a trained model, removing the unrolling steps in the test stage will not lead to a
performance decay but accelerate the inference; increasing them cannot further improve the
performance." After training, with ``test_time_eval``, the task's evaluation runs with 0, k
and 2k damped unrolled steps after the forward solve (k and lam the run's:
``EstimatorConfig.eval_unroll``), and with 0 steps at half and twice the forward budget;
each setting's metric and evaluation time go into ``metrics.json`` (``test_time``). For a
task that reports its sample count (``evaluate_sums``), "no decay" and "no gain" are judged
against two binomial standard errors of the metric at k steps, sqrt(p (1 - p) / n).
"""
from __future__ import annotations

import dataclasses
import math

from pipeline.experiments.diagnostics import clock


def test_time_evaluation(task, model, cfg) -> dict:
    """The evaluation of ``model`` under each test-time setting (see the module docstring);
    ``cfg`` is the run's :class:`~.train_config.TrainConfig`."""
    solver, est = cfg.forward_solver, cfg.estimator_config
    k = est.k
    settings = [("unroll 0", 0, solver.max_iter), (f"unroll k={k}", k, solver.max_iter),
                (f"unroll 2k={2 * k}", 2 * k, solver.max_iter),
                ("f_max_iter x0.5", 0, max(1, solver.max_iter // 2)),
                ("f_max_iter x2", 0, 2 * solver.max_iter)]
    metric, rows = task.primary_metric, []
    count = None
    for name, unroll, budget in settings:
        s = dataclasses.replace(solver, max_iter=budget)
        e = dataclasses.replace(est, eval_unroll=unroll)
        t0 = clock(cfg.device)
        if hasattr(task, "evaluate_sums"):
            sums = task.evaluate_sums(model, s, e)
            values, count = task.from_sums(sums), sums["count"]
        else:
            values = task.evaluate(model, s, e)
        rows.append({"setting": name, "unroll": unroll, "f_max_iter": budget,
                     metric: values[metric], "eval_s": clock(cfg.device) - t0})
    at = {r["setting"]: r[metric] for r in rows}
    p0, pk, p2k = at["unroll 0"], at[f"unroll k={k}"], at[f"unroll 2k={2 * k}"]
    sign = 1.0 if task.higher_is_better else -1.0  # a decay is a drop of a higher-is-better metric
    two_se = (2 * math.sqrt(max(pk * (1 - pk), 0.0) / count)
              if count and 0.0 <= pk <= 1.0 else None)
    return {"metric": metric, "k": k, "lam": est.lam, "count": count, "settings": rows,
            "decay_without_unrolling": sign * (pk - p0), "gain_from_2k": sign * (p2k - pk),
            "two_se": two_se}
