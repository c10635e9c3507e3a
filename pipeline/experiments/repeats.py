"""One job, several trainings in-process: the folds or seeds of a task, through the one loop.

    python -m pipeline train-repeats --study graph --name mutag_upg_official \
        --params '<merged run, JSON>' --data data/mutag --out results/graph/mutag_upg_official

The task's ``repeats(data, seed)`` lists the units, (label, data overrides, seed): the 10
folds of ``graph``, the seeds of ``node``. Each unit is one :func:`.train.train` call with
its own :class:`~.train_config.TrainConfig` (the run's, with the unit's data and seed) and its
own MLflow run, a child of the job's parent run (found by study, scale and run name, or
created: :func:`pipeline.tracking.job_parent_run`). Running them in one process saves the
start-up of a job per fold (imports, MLflow), which would eat the default budget.

Resuming: a finished unit leaves ``<checkpoints>/<study>/<name>/<hash>/<label>.json``,
the running one its ``<label>/last.pt``; a killed job restarts at the unit it was in,
mid-epoch, in the same child run. The job's outputs (``--out``):

* ``metrics.json``: per unit its status (``failed`` with the reason for a divergence or a
  collapse), best, and both protocol scores; over the units the mean ± std (population,
  as the official script) and the best, of the finished units;
* ``curves.csv``: every unit's step rows, with a ``unit`` column;
* ``history.csv``: every unit's evaluations (one row per epoch), with a ``unit`` column;
* ``weights/<label>.pt``: each unit's final weights (a state dict; ``torch.load(...,
  weights_only=True)``), kept with the resume state until the job ends.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from pipeline.experiments.checkpoint import load_checkpoint
from pipeline.experiments.tasks import get_task
from pipeline.experiments.train import train
from pipeline.experiments.train_config import TrainConfig


def protocol_scores(history: list[dict], test_key: str, val_key: str) -> dict:
    """``official``: the best test value over epochs (IGNN's, selected on test);
    ``clean``: the test value at the best validation epoch (the first, on ties); None
    where the run has no validation metric."""
    tests = [h[test_key] for h in history if h.get(test_key) is not None]
    out = {"official": max(tests) if tests else None, "official_epoch": None,
           "clean": None, "clean_epoch": None}
    if tests:
        out["official_epoch"] = next(h["epoch"] for h in history if h.get(test_key) == out["official"])
    vals = [h for h in history if h.get(val_key) is not None]
    if vals:
        best = max(vals, key=lambda h: h[val_key])  # max keeps the first of equal values
        out["clean"], out["clean_epoch"] = best[test_key], best["epoch"]
    return out


def summarize(values: list[float | None]) -> dict:
    """mean, std (population), best and count of the finite values."""
    good = [v for v in values if v is not None and math.isfinite(v)]
    if not good:
        return {"mean": None, "std": None, "best": None, "n": 0}
    mean = sum(good) / len(good)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in good) / len(good)),
            "best": max(good), "n": len(good)}


def run_units(cfg: TrainConfig, params: dict, *, study: str, name: str, data_dir: str,
              tracking_uri: str, artifacts: str, scale: str, tags: dict, checkpoints: Path,
              batch_size: int, log=print, system_metrics_s: float = 0.0
              ) -> tuple[dict, list[dict], Path]:
    """Train every unit of the run; return (the job's summary, each unit's results with
    its curves and history, the resume folder)."""
    from pipeline import environment, tracking
    from pipeline.data import dataset_digest
    from pipeline.io import params_hash

    task_cls = get_task(cfg.task)
    units = task_cls.repeats(cfg.data, cfg.seed) if hasattr(task_cls, "repeats") \
        else [("run", {}, cfg.seed)]
    phash = params_hash(params)
    folder = checkpoints / study / name / phash
    env = environment.record(cfg.device)
    digest = dataset_digest(data_dir)
    parent_tags = {"study": study, "run": name, "task": cfg.task, "scale": scale,
                   "dataset": cfg.data.get("dataset", ""), "estimator": cfg.estimator,
                   "protocol": cfg.data.get("protocol", ""), "params_hash": phash,
                   **environment.tags(env), **tags}
    job_params = {"run": dataclasses.asdict(cfg), "study": study, "name": name, "scale": scale}
    parent = tracking.job_parent_run(tracking_uri, study, name, parent_tags, job_params,
                                     artifacts, batch_size)
    done = {label: json.loads((folder / f"{label}.json").read_text())
            for label, _, _ in units if (folder / f"{label}.json").is_file()}
    resumes = {label: load_checkpoint(folder / label / "last.pt") for label, _, _ in units
               if label not in done and (folder / label / "last.pt").is_file()}
    keep = {r["mlflow_run_id"] for r in done.values()} | \
        {ck.get("run_id") for ck in resumes.values()}
    stale = [rid for rid in tracking.child_runs(tracking_uri, parent).values() if rid not in keep]
    tracking.delete_runs(tracking_uri, stale)   # a rerun job: one child per unit
    results = []
    try:
        for label, override, seed in units:
            if label in done:
                log(f"{name}/{label}: done in an earlier attempt ({done[label]['status']})")
                results.append(done[label])
                continue
            unit_cfg = dataclasses.replace(cfg, data={**cfg.data, **override}, seed=seed)
            task = task_cls(unit_cfg.model, unit_cfg.data, data_dir, unit_cfg.device,
                            unit_cfg.batch_size, unit_cfg.eval_batch_size, unit_cfg.seed)
            checkpoint = folder / label / "last.pt"
            resume = resumes.get(label)
            unit_tags = {**parent_tags, "run": f"{name}/{label}", "unit": label,
                         "role": "unit", "mlflow.parentRunId": parent.run_id or ""}
            if parent.run_id is None:
                unit_tags.pop("mlflow.parentRunId")
            with tracking.start_run(tracking_uri, study, f"{name}/{label}", unit_tags,
                                    {"run": dataclasses.asdict(unit_cfg), "study": study,
                                     "name": name, "unit": label, "scale": scale},
                                    artifacts, run_id=resume.get("run_id") if resume else None,
                                    batch_size=batch_size,
                                    system_metrics_s=system_metrics_s) as tracker:
                tracker.log_dataset(task.dataset, digest, str(data_dir),
                                    ["train", task.eval_split])
                result = train(unit_cfg, task, tracker, checkpoint,
                               log=lambda msg, label=label: log(f"[{label}] {msg}"),
                               resume=resume, weights=folder / f"{label}.pt")
                result.update(unit=label, seed=seed, mlflow_run_id=tracker.run_id,
                              **_scores(task, result["history"]))
            from pipeline.io import write_json
            write_json(result, folder / f"{label}.json")
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
            results.append(result)
    except BaseException as err:
        if parent.run_id is not None:
            parent.set_tags({"failure_reason": f"{type(err).__name__}: {err}"[:5000]})
            tracking.finish_parent(parent, "FAILED")
        raise
    summary = _summary(cfg, results, study=study, name=name, scale=scale, phash=phash,
                       parent_id=parent.run_id)
    summary["environment"] = {**env, **results[-1].get("numerics", {})}
    parent.log_metrics({tracking.protocol_metric(key, stat): value
                        for key in ("official", "clean")
                        for stat, value in summary[key].items() if value is not None})
    parent.set_tags({"failed_units": ",".join(u["unit"] for u in summary["units"]
                                              if u["status"] == "failed") or "none"})
    if summary["status"] == "failed":  # every unit diverged: so did the job
        parent.set_tags({"failure_reason": summary["reason"][:5000]})
        tracking.finish_parent(parent, "FAILED")
    else:
        tracking.finish_parent(parent)
    return summary, results, folder


def _scores(task, history: list[dict]) -> dict:
    test_key = task.primary_metric.removeprefix("val_")
    return protocol_scores(history, test_key, f"val_{test_key}")


UNIT_KEYS = ("unit", "seed", "status", "reason", "best", "best_epoch", "final", "official",
             "official_epoch", "clean", "clean_epoch", "epochs_completed", "steps",
             "time_per_epoch_s", "mean_forward_s", "mean_backward_s", "mean_step_s",
             "peak_memory_mb", "trainable_params", "mlflow_run_id", "diagnostics")


def _summary(cfg: TrainConfig, results: list[dict], **info) -> dict:
    finished = [r for r in results if r["status"] == "finished"]
    first = results[0]
    return {
        "status": "finished" if finished else "failed",
        "reason": "" if finished else "every unit failed: " + "; ".join(
            f"{r['unit']}: {r['reason']}" for r in results),
        "study": info["study"], "name": info["name"], "scale": info["scale"],
        "params_hash": info["phash"], "mlflow_parent_run_id": info["parent_id"],
        "git_commit": first["git_commit"], "task": cfg.task, "dataset": first["dataset"],
        "protocol": cfg.data.get("protocol"), "estimator": cfg.estimator, "k": cfg.k,
        "lam": cfg.lam, "epochs": cfg.epochs, "primary_metric": first["primary_metric"],
        "official": summarize([r["official"] for r in finished]),
        "clean": summarize([r["clean"] for r in finished]),
        "failed": [{"unit": r["unit"], "reason": r["reason"]} for r in results
                   if r["status"] == "failed"],
        "units": [{k: r.get(k) for k in UNIT_KEYS} for r in results],
    }


# --- CLI edge --------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    from pipeline.experiments.train_job import add_arguments as train_arguments
    train_arguments(parser)


def main(args) -> int:
    import pandas as pd

    from pipeline.experiments.train_job import config_from_args
    from pipeline.io import prune_empty_dirs, write_csv, write_json

    params, cfg = config_from_args(args)
    checkpoints = Path(args.checkpoints)
    try:
        summary, results, folder = run_units(
            cfg, params, study=args.study, name=args.name, data_dir=args.data,
            tracking_uri=args.tracking_uri, artifacts=args.artifacts, scale=args.scale,
            tags=json.loads(args.tags), checkpoints=checkpoints,
            batch_size=args.tracking_batch_size, log=lambda msg: print(msg, flush=True),
            system_metrics_s=args.system_metrics)
        out = Path(args.out)
        curves = [pd.DataFrame(r["curves"]).assign(unit=r["unit"]) for r in results]
        history = [pd.DataFrame(r["history"]).assign(unit=r["unit"]) for r in results]
        write_csv(pd.concat(curves, ignore_index=True), out / "curves.csv")
        write_csv(pd.concat(history, ignore_index=True), out / "history.csv")
        from pipeline.tracking import store_seconds
        (out / "weights").mkdir(parents=True, exist_ok=True)
        for unit in results:  # each unit's final weights, kept with the results
            shutil.move(folder / f"{unit['unit']}.pt", out / "weights" / f"{unit['unit']}.pt")
        write_json({**summary, "tracking_s": store_seconds()}, out / "metrics.json")
        shutil.rmtree(folder, ignore_errors=True)  # concluded: no resume state is left
    finally:
        prune_empty_dirs(checkpoints / args.study / args.name, levels=3)
    for key in ("official", "clean"):
        s = summary[key]
        if s["n"]:
            print(f"{args.study}/{args.name}: {key} {summary['primary_metric']} "
                  f"{s['mean']:.4f} ± {s['std']:.4f} (best {s['best']:.4f}, {s['n']} units)")
    for failed in summary["failed"]:
        print(f"{args.study}/{args.name}/{failed['unit']}: FAILED {failed['reason']}")
    return 0
