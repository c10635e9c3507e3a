"""The one training loop for every implicit model: :func:`train`.

A run is a task (:mod:`.tasks`: the model, the batches, the loss and the evaluation)
plus the loop's keys (:class:`~.train_config.TrainConfig`). The loop walks the epochs
and their batches, calls :func:`~.step.train_step` once per batch, evaluates at epoch
ends (and every ``eval_every`` steps), checkpoints (:mod:`.checkpoint`), logs the rows
to the tracker (:mod:`.results`), and returns the run's results. Where the rest lives:

* :mod:`.train_config`: the configuration and the checks made before any job;
* :mod:`.optim`: the optimizer and the learning-rate schedule;
* :mod:`.step`: one step, its metrics row, and the divergence rules;
* :mod:`.diagnostics`: the gradient diagnostics of a step, and the spectral radii after
  training;
* :mod:`.test_time`: the evaluation with test-time unrolling after training;
* :mod:`.checkpoint`: save, load, resume;
* :mod:`.results`: the rows to MLflow and the results summary (``metrics.json``);
* :mod:`.train_job`: the ``python -m pipeline train`` command around it.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from pipeline import tracking as M
from pipeline.experiments import determinism, distributed
from pipeline.experiments.checkpoint import restore, save_run, save_weights
from pipeline.experiments.diagnostics import measure_spectral
from pipeline.experiments.optim import make_optimizer, make_scheduler
from pipeline.experiments.results import catch_up, log_new_rows, summarize
from pipeline.experiments.step import Divergence, check_capped, train_step
from pipeline.experiments.test_time import test_time_evaluation
from pipeline.experiments.train_config import TrainConfig
from pipeline.progress import progress


def train(cfg: TrainConfig, task, tracker, checkpoint: Path | None = None, log=print,
          rank: int = 0, world_size: int = 1, resume: dict | None = None,
          weights: Path | None = None) -> dict:
    """Train; return the results dict (also on divergence, with status "failed").

    ``task`` is a built task (:func:`.tasks.get_task`); ``tracker`` a
    :mod:`pipeline.tracking` run; ``checkpoint`` the file to save to; ``resume`` a
    checkpoint loaded by :func:`~.checkpoint.load_checkpoint` to continue from, in the
    same tracker run; ``weights`` where the final (or, on divergence, the last) model
    weights go, to inspect after the run.

    Each step's row (:func:`~.step.train_step`) is kept in the results and logged to
    the tracker at every checkpoint. A divergence (the rules of :mod:`.step`) stops the
    run: the tracker marks it FAILED with the reason and the results say ``"status":
    "failed"``; the job still exits 0, since a divergence is a result (the paper reports
    failing runs). A task with ``state_dict`` / ``load_state_dict`` (the lm task's
    segment memory) has that state checkpointed with the loop's.

    Under ``torchrun`` (``world_size`` > 1, the process group joined: :mod:`.distributed`)
    the model trains inside DistributedDataParallel; rank 0 alone writes the checkpoint
    (with every rank's RNG state) and the weights, and logs through ``tracker`` (the other
    ranks pass a :class:`~pipeline.tracking.NullRun`); every rank returns the same results.
    """
    d = distributed.Dist(rank, world_size)
    numerics = determinism.configure(cfg.deterministic)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    if rank:  # the same initial model on every rank, but each rank its own dropout masks
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
    net = distributed.wrap(model, d, cfg.device)  # forwards go through DDP; the rest uses model
    opt = make_optimizer(cfg, model)
    steps_per_epoch = task.steps_per_epoch(world_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    sched = make_scheduler(cfg, opt, total_steps, steps_per_epoch)
    state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "best": None, "best_step": 0,
             "best_epoch": 0, "history": [], "curves": [], "memory_epoch": -1,
             "logged_rows": 0, "logged_evals": 0}
    metric = task.primary_metric
    if resume is not None:
        state = restore(resume, model, opt, sched, task, d, checkpoint)
        catch_up(tracker, state, metric)
        log(f"resumed from {checkpoint or 'a checkpoint'} at epoch {state['epoch']}, "
            f"step {state['step']}")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracker.set_tags({"trainable_params": n_params})
    log(f"{task.name} task, {type(model).__name__}: {n_params:,} trainable parameters, "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps")
    diag_cfg = cfg.diagnostics_config
    model.train()
    status, reason = "finished", ""

    def save() -> None:
        save_run(checkpoint, model, opt, sched, task, state, tracker.run_id, cfg.device, d)
        log_new_rows(tracker, state, metric)

    def evaluate(epoch_s: float | None) -> None:
        values = _evaluate(cfg, task, model, d)
        value = values[metric]
        if not math.isfinite(value):
            raise Divergence(f"non-finite evaluation {metric} {value} at step {state['step']}")
        better = (state["best"] is None
                  or (value > state["best"] if task.higher_is_better else value < state["best"]))
        if better:
            state["best"], state["best_step"], state["best_epoch"] = value, state["step"], state["epoch"]
        entry = {"epoch": state["epoch"], "step": state["step"], **values,
                 "best": state["best"]}
        if epoch_s is not None:
            entry["epoch_s"] = epoch_s
        state["history"].append(entry)

    try:
        for epoch in range(state["epoch"], cfg.epochs):
            if state["step"] >= total_steps:
                break
            epoch_s = 0.0
            batches = itertools.islice(task.batches("train", epoch, rank, world_size),
                                       state["step_in_epoch"], steps_per_epoch)
            todo = min(steps_per_epoch - state["step_in_epoch"], total_steps - state["step"])
            mine = itertools.islice(batches, todo)
            for batch in (progress(mine, todo, f"epoch {epoch + 1}/{cfg.epochs}", every=30.0)
                          if d.is_main else mine):  # one progress line per job, rank 0's
                row = train_step(cfg, task, model, opt, sched, batch, state, diag_cfg, net, d)
                epoch_s += row.pop("_train_s")
                state["curves"].append({"step": state["step"], **row})
                state["step"] += 1
                state["step_in_epoch"] += 1
                epoch_ends = (state["step"] == total_steps
                              or state["step_in_epoch"] == steps_per_epoch)
                if cfg.eval_every and state["step"] % cfg.eval_every == 0 and not epoch_ends:
                    evaluate(None)  # (the epoch-end evaluation follows at the epoch's end)
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                    save()
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            evaluate(epoch_s)
            check_capped(cfg, state, steps_per_epoch)
            last = state["curves"][-1][M.TRAIN_LOSS] if state["curves"] else float("nan")
            log(f"epoch {epoch + 1}/{cfg.epochs}: {metric} {state['history'][-1][metric]:.4f} "
                f"(best {state['best']:.4f}), loss {last:.4f}, {epoch_s:.1f}s")
            save()
    except Divergence as err:
        log_new_rows(tracker, state, metric)
        status, reason = "failed", str(err)
        log(f"DIVERGED: {reason}")
        tracker.fail(reason)
    if weights is not None and d.is_main:
        save_weights(weights, model)
    results = summarize(cfg, task, state, status, reason, n_params)
    results["numerics"] = numerics
    if cfg.spectral_batches and d.is_main and status == "finished":
        results["spectral"] = measure_spectral(task, model, diag_cfg, cfg.spectral_batches)
    if cfg.test_time_eval and d.is_main and status == "finished":
        results["test_time"] = test_time_evaluation(task, model, cfg)
    return results


def _evaluate(cfg: TrainConfig, task, model, d: distributed.Dist) -> dict[str, float]:
    """The task's evaluation. Under DDP every rank first takes rank 0's buffers (one model
    for all); a task with ``evaluate_sums`` then evaluates a shard per rank and the sums are
    added up, any other task evaluates the whole split on every rank (rank 0's values)."""
    solver, est = cfg.forward_solver, cfg.estimator_config
    if not d.active:
        return task.evaluate(model, solver, est)
    distributed.sync_buffers(model, d)
    if hasattr(task, "evaluate_sums"):
        sums = task.evaluate_sums(model, solver, est, rank=d.rank, world_size=d.world_size)
        keys = sorted(sums)
        total = distributed.sum_tensor(torch.tensor([float(sums[k]) for k in keys]), d)
        return task.from_sums(dict(zip(keys, total.tolist())))
    return distributed.broadcast(task.evaluate(model, solver, est), d)
