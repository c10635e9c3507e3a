"""The one training loop for every implicit model: a task (:mod:`.tasks`) plus loop keys.

    python -m pipeline train --study ablations --name upg_sgd --params '<merged run, JSON>' \
        --data data/digits --out results/ablations/upg_sgd --checkpoints checkpoints

A run is a study's ``defaults`` deep-merged with one entry of its ``runs`` (the
Snakemake helper ``study_run`` in ``workflow/rules/common.smk``); :class:`TrainConfig`
holds the loop's keys, the ``task`` name and the task's ``model:`` and ``data:`` blocks.
The MLflow experiment is the study, the run is named by ``--name``.

Each step logs (names from :mod:`pipeline.tracking`) the loss, the task's training
metric, the learning rate, the forward solver's steps and residual at h* (relative, and
in the solver's own stop norm; per layer for a stack of implicit layers), and the
step's forward / backward / total time. After every ``diagnostics_every`` steps the
diagnostics of :mod:`.diagnostics` run on the step's own state, before the optimizer
step, on the gradient the optimizer then applies; they are timed on their own and
fork the RNG, so they never change training. The first estimator step of an epoch is
measured for tensor memory instead of time (the CPU counter slows every op).

Checkpoints hold tensors and plain containers only (``torch.load(weights_only=True)``):
model, optimizer, scheduler, each rank's RNG states (CPU, and CUDA's), the loop state
and the MLflow run id. They live under ``<checkpoints>/<study>/<name>/<params hash>/``,
are written at each epoch end and every ``checkpoint_every`` steps, and a killed job
resumes mid-epoch in the same MLflow run, equal to an uninterrupted one. A concluded
run removes its checkpoint. A divergent run (non-finite loss, a diverged forward solve,
a forward residual past ``diverge_residual``, a loss past ``diverge_loss_factor`` times
the mean loss of its first ``diverge_loss_window`` steps, or, with ``diverge_capped_epochs``,
a forward solve at its cap for that many epochs + 1, its residual grown 10x) stops; MLflow marks it FAILED
with the reason, ``metrics.json`` says ``"status": "failed"``, and the job still exits 0:
a divergence is a result (the paper reports failing runs), which the workflow's
``onsuccess`` handler and the study's table name.

Options any study can set: ``jacobian_reg`` adds the Jacobian penalty of
:mod:`pipeline.deq.jacobian` at the step's recorded h* on its seeded steps (its forward
counted as forward time); ``adaptive_lam_every`` sets the estimator's lambda to
1/rho(dF/dh) (power method at h*, clipped to (0, 1]) every N estimator steps, used from
the next step on and kept in the checkpoint. A task with ``state_dict`` /
``load_state_dict`` (the lm task's segment memory) has that state checkpointed with the
loop's; one with ``batch_tokens`` gets ``time/tokens_per_s``; one with ``summary`` adds
its own keys to the results.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import tracking as M
from pipeline.deq import (EstimatorConfig, JacobianRegConfig, SolverConfig, jacobian_penalty,
                          record_layers, spectral_radius)
from pipeline.experiments import distributed
from pipeline.experiments.diagnostics import (DiagnosticsConfig, clock, diagnose, rng_state,
                                              set_rng_state)
from pipeline.experiments.tasks import get_task
from pipeline.memory import peak_memory
from pipeline.progress import progress

Tensor = torch.Tensor


JR_OFF = {"weight": 0.0, "freq": 0.0, "incr": 0.0, "incr_every": 0, "samples": 1}


@dataclass(frozen=True)
class TrainConfig:
    """The loop's keys, the task, and the task's ``model:`` / ``data:`` blocks.

    The defaults are params.yaml's ``ablations.defaults`` (``tests/test_config.py``
    checks that they agree).
    """

    task: str = "image"
    model: dict = field(default_factory=lambda: {"preset": "tiny", "dropout": 0.25,
                                                 "num_layers": 10})
    data: dict = field(default_factory=lambda: {"dataset": "digits"})
    epochs: int = 3
    max_steps: int | None = None             # cap on all steps; None = epochs x steps/epoch
    max_steps_per_epoch: int | None = None   # cap for smoke tests; None = the whole epoch
    batch_size: int = 32
    eval_batch_size: int = 500
    eval_every: int = 0                      # extra evaluations every N steps; 0 = epoch ends
    seed: int = 0
    device: str = "cpu"
    f_solver: str = "broyden"
    f_max_iter: int = 22                     # MDEQ-Tiny F_THRES
    f_tol: float = 1e-3
    f_stop_mode: str = "rel"                 # rel | abs | inf (IGNN: max |change|)
    b_solver: str = "broyden"
    b_max_iter: int = 24                     # MDEQ-Tiny B_THRES
    b_tol: float = 1e-3
    b_stop_mode: str = "rel"
    estimator: str = "implicit"
    k: int = 5
    lam: float = 0.5
    pretrain_steps: int = 20                 # MDEQ's unrolled pretraining, weight-tied
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2.5e-6
    schedule: str = "cosine"
    lr_decay_epochs: list = field(default_factory=list)  # schedule multistep: epochs after
    lr_decay_factor: float = 0.5                          # which the lr is multiplied by this
    warmup_steps: int = 0                    # linear warm-up before the schedule
    grad_clip: float | None = None           # max gradient norm; None = no clipping
    checkpoint_every: int = 0                # steps; 0 = epoch ends only
    diagnostics_every: int = 40
    reference_tol: float = 1e-8              # GMRES reference, per sample, float64
    reference_max_iter: int = 1000
    reference_restart: int = 400
    timing_repeats: int = 3
    memory_every: int = 1                    # measure a step's tensor memory every N epochs
                                             # (0: never); the CPU counter slows that step
    power_iters: int = 40
    power_tol: float = 1e-3
    diverge_residual: float = 1e3
    diverge_loss_factor: float | None = 20.0  # loss > factor x early loss: divergence
    diverge_loss_window: int = 10            # early loss: mean of the first N steps
    diverge_capped_epochs: int | None = None  # forward solve at its cap for N+1 epochs in a
                                              # row, residual grown 10x: divergence (None: off)
    nproc_per_node: int = 1                  # ranks: >1 the rule runs the job under torchrun
    spectral_batches: int = 0                # after training: rho(dF/dh), rho(dF_lam/dh) on
                                             # this many evaluation batches (0: not measured)
    # Jacobian regularization (pipeline.deq.jacobian): weight, freq, incr, incr_every, samples
    jacobian_reg: dict = field(default_factory=lambda: dict(JR_OFF))
    adaptive_lam_every: int = 0              # lam = 1/rho(dF/dh), clipped to (0, 1], refreshed
                                             # every N estimator steps (0: the fixed lam)

    @classmethod
    def from_params(cls, params: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown run keys {unknown}; valid keys: {sorted(names)}")
        cfg = cls(**params)
        get_task(cfg.task)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Combinations that would fail inside a job (or be silently ignored): refused here,
        where params.yaml is validated, before any job starts."""
        jr = self.jacobian_reg_config  # validates the block
        if self.estimator in ("bptt", "unrolled"):  # no fixed point h* is recorded
            for key, value in (("diagnostics_every", self.diagnostics_every),
                               ("adaptive_lam_every", self.adaptive_lam_every),
                               ("spectral_batches", self.spectral_batches),
                               ("jacobian_reg.weight", jr.weight)):
                if value:
                    raise ValueError(f"{key}: {value} needs the fixed point h*, which estimator "
                                     f"{self.estimator!r} does not record; set it to 0")
        if self.optimizer == "sgd" and self.nesterov and self.momentum <= 0:
            raise ValueError(f"nesterov: true needs momentum > 0, not {self.momentum}")
        if self.lr_decay_epochs and self.schedule != "multistep":
            raise ValueError(f"lr_decay_epochs: {self.lr_decay_epochs} is used by schedule "
                             f"multistep only, not {self.schedule!r}")
        self.forward_solver, self.estimator_config  # SolverConfig's own checks

    @property
    def jacobian_reg_config(self) -> JacobianRegConfig:
        unknown = sorted(set(self.jacobian_reg) - set(JR_OFF))
        if unknown:
            raise ValueError(f"unknown jacobian_reg keys {unknown}; valid keys: {sorted(JR_OFF)}")
        return JacobianRegConfig(**{**JR_OFF, **self.jacobian_reg}, seed=self.seed)

    @property
    def forward_solver(self) -> SolverConfig:
        return SolverConfig(self.f_solver, self.f_max_iter, self.f_tol, self.f_stop_mode)

    @property
    def estimator_config(self) -> EstimatorConfig:
        return EstimatorConfig(self.estimator, self.k, self.lam, self.b_solver, self.b_max_iter,
                               self.b_tol, self.b_stop_mode)

    @property
    def diagnostics_config(self) -> DiagnosticsConfig:
        return DiagnosticsConfig(
            forward_solver=self.forward_solver, estimator=self.estimator_config,
            implicit=EstimatorConfig("implicit", b_solver=self.b_solver,
                                     b_max_iter=self.b_max_iter, b_tol=self.b_tol,
                                     b_stop_mode=self.b_stop_mode),
            reference=EstimatorConfig("implicit", b_solver="gmres",
                                      b_max_iter=self.reference_max_iter,
                                      b_tol=self.reference_tol, b_restart=self.reference_restart),
            lam=self.lam, timing_repeats=self.timing_repeats, power_iters=self.power_iters,
            power_tol=self.power_tol, seed=self.seed, device=self.device)


class Divergence(RuntimeError):
    """Training diverged; the message is the reason recorded in MLflow and metrics.json."""


def make_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    raise ValueError(f"optimizer {cfg.optimizer!r}; valid: ['adam', 'sgd']")


SCHEDULES = ("cosine", "constant", "multistep")


def make_scheduler(cfg: TrainConfig, opt, total_steps: int, steps_per_epoch: int = 1):
    after = max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":  # MDEQ: cosine annealing over all iterations
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, after, eta_min=1e-6)
    elif cfg.schedule == "constant":
        main = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    elif cfg.schedule == "multistep":  # IGNN: lr halved once 50 epochs are done (epoch 51)
        main = torch.optim.lr_scheduler.MultiStepLR(
            opt, [e * steps_per_epoch - cfg.warmup_steps for e in cfg.lr_decay_epochs],
            gamma=cfg.lr_decay_factor)
    else:
        raise ValueError(f"schedule {cfg.schedule!r}; valid: {list(SCHEDULES)}")
    if not cfg.warmup_steps:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / cfg.warmup_steps,
                                             total_iters=cfg.warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], [cfg.warmup_steps])


def _layer_stats(layers) -> tuple[float, float, bool, str]:
    """(steps summed, worst relative residual, any diverged, first reason) of a record."""
    if not layers:
        return float("nan"), float("nan"), False, ""
    diverged = [r.stats for r in layers if r.stats.diverged]
    return (float(sum(r.stats.nstep for r in layers)), max(r.stats.rel_residual for r in layers),
            bool(diverged), diverged[0].reason if diverged else "")


def _backward_row(layers, step: int, d: distributed.Dist) -> dict[str, float]:
    """The implicit backward solve of this step (worst layer, worst rank): its relative
    residual and steps; a non-finite residual on any rank is a divergence."""
    solves = [s for r in layers for s in r.backward_stats]
    diverged = [s.reason for s in solves if s.diverged]
    values = {"diverged": float(bool(diverged)), "solved": float(bool(solves)),
              M.SOLVER_BACKWARD_REL_RESIDUAL: max((s.rel_residual for s in solves), default=0.0),
              M.SOLVER_BACKWARD_NSTEPS: float(max((s.nstep for s in solves), default=0))}
    values = distributed.reduce_values(values, {}, d, default=distributed.MAX)
    if values.pop("diverged"):
        why = diverged[0] if diverged else "diverged on another rank"
        raise Divergence(f"backward solver: {why} (training step {step})")
    return values if values.pop("solved") else {}


def stop_residual(stats, stop_mode: str) -> float:
    """A solve's residual in its own stop norm (rel, abs or inf)."""
    return {"rel": stats.rel_residual, "abs": stats.abs_residual,
            "inf": stats.inf_residual}[stop_mode]


def _layer_rows(layers, stop_mode: str) -> dict[str, float]:
    """The forward solve's residual in its stop norm (worst layer), whether every layer
    converged, and, for a stack of implicit layers, each layer's steps and residual."""
    if not layers:
        return {}
    residuals = [stop_residual(r.stats, stop_mode) for r in layers]
    row = {M.SOLVER_STOP_RESIDUAL: max(residuals),
           M.FORWARD_CONVERGED: float(all(r.stats.converged for r in layers))}
    if len(layers) > 1:
        for i, (record, residual) in enumerate(zip(layers, residuals), start=1):
            row[M.SOLVER_NSTEPS_LAYER.format(layer=i)] = float(record.stats.nstep)
            row[M.SOLVER_STOP_RESIDUAL_LAYER.format(layer=i)] = residual
    return row


CAPPED_GROWTH = 10.0  # the collapse rule's residual growth over its window of epochs


def _check_capped(cfg: TrainConfig, state: dict, steps_per_epoch: int) -> None:
    """The collapse rule of a long run (the official PPI runs that "collapse", appendix
    §4.3): the forward solve at its cap on every step of ``diverge_capped_epochs`` + 1
    epochs in a row, with the epoch-mean residual (in the stop norm) grown at least
    ``CAPPED_GROWTH`` times from the first of them to the last. A residual that merely
    hovers at the cap (float32's floor under an absolute tolerance) is not a collapse."""
    if not cfg.diverge_capped_epochs:
        return
    epoch = state["epoch"] - 1
    rows = [r for r in state["curves"] if r["step"] // steps_per_epoch == epoch
            and not r[M.PRETRAINING] and M.FORWARD_CONVERGED in r]
    if not rows:
        return
    residual = sum(r[M.SOLVER_STOP_RESIDUAL] for r in rows) / len(rows)
    capped = all(r[M.FORWARD_CONVERGED] == 0.0 for r in rows)
    window = cfg.diverge_capped_epochs
    streak = (state.get("capped_streak", []) + [residual])[-(window + 1):] if capped else []
    state["capped_streak"] = streak
    if len(streak) > window and streak[-1] >= CAPPED_GROWTH * streak[0]:
        raise Divergence(f"forward solve at its cap of {cfg.f_max_iter} steps for {window + 1} "
                         f"epochs with its {cfg.f_stop_mode} residual grown "
                         f"{streak[-1] / streak[0]:.3g}x ({streak[0]:.3g} -> {streak[-1]:.3g}) "
                         f"at epoch {epoch + 1}")


# --- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(path: Path, model, opt, sched, state: dict, run_id, device: str,
                    rng: list | None = None) -> None:
    """Tensors and plain containers only; ``rng`` holds one entry per rank, in rank order
    (this process's alone when not given)."""
    from pipeline.io import atomic_path
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "rng": rng or [rng_state(device)],
               "state": state, "run_id": run_id}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_weights(path: Path, model) -> None:
    """The model's state dict alone (``torch.load(path, weights_only=True)`` reads it)."""
    from pipeline.io import atomic_path
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def load_checkpoint(path: Path) -> dict:
    """``weights_only=True`` onto the CPU: the RNG states must stay CPU ByteTensors, and
    load_state_dict moves the rest onto the model's device."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the loop --------------------------------------------------------------------------------

def train(cfg: TrainConfig, task, tracker, checkpoint: Path | None = None, log=print,
          rank: int = 0, world_size: int = 1, resume: dict | None = None,
          weights: Path | None = None) -> dict:
    """Train; return the results dict (also on divergence, with status "failed").

    ``task`` is a built task (:func:`.tasks.get_task`); ``tracker`` a
    :mod:`pipeline.tracking` run; ``checkpoint`` the file to save to; ``resume`` a
    checkpoint loaded by :func:`load_checkpoint` to continue from; ``weights`` where the
    final (or, on divergence, the last) model weights go, to inspect after the run.

    Under ``torchrun`` (``world_size`` > 1, the process group joined: :mod:`.distributed`)
    the model trains inside DistributedDataParallel; rank 0 alone writes the checkpoint
    (with every rank's RNG state) and the weights, and logs through ``tracker`` (the other
    ranks pass a :class:`~pipeline.tracking.NullRun`); every rank returns the same results.
    """
    d = distributed.Dist(rank, world_size)
    torch.use_deterministic_algorithms(True, warn_only=True)
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
        ck = resume
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if len(ck["rng"]) != world_size:  # the batch order and steps per epoch depend on it
            raise ValueError(f"{checkpoint or 'the checkpoint'} was written by "
                             f"{len(ck['rng'])} rank(s); resume it with as many, not "
                             f"{world_size} (or delete it to start over)")
        set_rng_state(ck["rng"][rank])
        state = ck["state"]
        if "task" in state:  # a task's own state across steps (segment memory)
            task.load_state_dict(state["task_ranks"][rank] if "task_ranks" in state
                                 else state["task"])
        # Rows are logged right after each checkpoint; a kill in between leaves MLflow
        # behind the checkpoint. Ask what it has, and log the rest once.
        last_row = tracker.last_step(M.TRAIN_LOSS)
        last_eval = tracker.last_step(M.eval_metric(metric))
        state["logged_rows"] = sum(1 for r in state["curves"]
                                   if last_row is not None and r["step"] <= last_row)
        state["logged_evals"] = sum(1 for h in state["history"]
                                    if last_eval is not None and h["step"] <= last_eval)
        _flush(tracker, state, metric)
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
        if hasattr(task, "state_dict"):  # under DDP every rank's (its own segment memory)
            state["task"] = task.state_dict()
            if d.active:
                state["task_ranks"] = distributed.gather(state["task"], d)
        rngs = distributed.gather(rng_state(cfg.device), d)  # every rank's, in rank order
        if checkpoint is not None and d.is_main:
            save_checkpoint(checkpoint, model, opt, sched, state, tracker.run_id, cfg.device,
                            rngs)
        _flush(tracker, state, metric)

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
                row = _step(cfg, task, model, opt, sched, batch, state, diag_cfg, net, d)
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
            _check_capped(cfg, state, steps_per_epoch)
            last = state["curves"][-1][M.TRAIN_LOSS] if state["curves"] else float("nan")
            log(f"epoch {epoch + 1}/{cfg.epochs}: {metric} {state['history'][-1][metric]:.4f} "
                f"(best {state['best']:.4f}), loss {last:.4f}, {epoch_s:.1f}s")
            save()
    except Divergence as err:
        _flush(tracker, state, metric)
        status, reason = "failed", str(err)
        log(f"DIVERGED: {reason}")
        tracker.fail(reason)
    if weights is not None and d.is_main:
        save_weights(weights, model)
    results = _results(cfg, task, state, status, reason, n_params)
    if cfg.spectral_batches and d.is_main and status == "finished":
        results["spectral"] = measure_spectral(cfg, task, model)
    return results


def measure_spectral(cfg: TrainConfig, task, model) -> dict:
    """rho(dF/dh) and rho(dF_lam/dh) at the h* of the trained model on the first
    ``spectral_batches`` evaluation batches (eval mode), by the power method with
    ``power_iters`` / ``power_tol``, lam = the run's ``lam`` (appendix §4.3: rho_lam stays
    near 1 while rho often exceeds 1). Per sample, the worst layer; then the mean over
    samples (``rho``, ``rho_lambda``), their largest values, and whether every estimate
    settled (a complex leading pair never settles: then rho is only a rough value)."""
    from pipeline.deq import spectral_radius

    was_training = model.training
    model.eval()
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    rho, rho_lam, settled, samples = [], [], True, 0
    for batch in itertools.islice(task.batches(task.eval_split, 0), cfg.spectral_batches):
        with torch.no_grad(), record_layers() as layers:
            task.loss(model, batch, cfg.forward_solver, cfg.estimator_config)
        for lam, out in ((1.0, rho), (cfg.lam, rho_lam)):
            ests = [spectral_radius(r.func, r.h_star, lam, cfg.power_iters, gen, cfg.power_tol)
                    for r in layers]
            out.append(torch.stack([e.rho for e in ests]).amax(dim=0))
            settled = settled and all(e.settled for e in ests)
        samples += len(rho[-1])
        del layers
    model.train(was_training)
    rho_t, lam_t = torch.cat(rho), torch.cat(rho_lam)
    return {"rho": rho_t.mean().item(), "rho_lambda": lam_t.mean().item(),
            "rho_max": rho_t.max().item(), "rho_lambda_max": lam_t.max().item(),
            "fraction_rho_above_1": (rho_t > 1).float().mean().item(),
            "lam": cfg.lam, "batches": len(rho), "samples": samples,
            "power_iters": cfg.power_iters, "settled": settled, "split": task.eval_split}


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


def _step(cfg: TrainConfig, task, model, opt, sched, batch, state: dict,
          diag_cfg: DiagnosticsConfig, net=None, d: distributed.Dist = distributed.SINGLE
          ) -> dict:
    """One training step (and its diagnostics); returns its row of metrics.

    ``net`` is what the forward goes through (``model`` in DDP under torchrun); the
    estimator, the diagnostics and the optimizer see ``model``, the unwrapped module.
    """
    net = model if net is None else net
    step = state["step"]
    pretraining = step < cfg.pretrain_steps
    est = task.pretrain_estimator(model) if pretraining else cfg.estimator_config
    if cfg.adaptive_lam_every and not pretraining:   # the lam of the last refresh
        est = dataclasses.replace(est, lam=state.get("adaptive_lam", cfg.lam))
        diag_cfg = dataclasses.replace(diag_cfg, estimator=est, lam=est.lam)
    jr = cfg.jacobian_reg_config
    jr_now = jr.applies(step, pretraining)
    # after every `diagnostics_every` steps (not at the initialisation, where the reference
    # costs the most and tells the least)
    diagnose_now = bool(cfg.diagnostics_every) and (step + 1) % cfg.diagnostics_every == 0 \
        and not pretraining
    measure = (not pretraining and bool(cfg.memory_every)
               and state["epoch"] % cfg.memory_every == 0
               and state["memory_epoch"] != state["epoch"])
    if measure:
        state["memory_epoch"] = state["epoch"]
    rng = rng_state(cfg.device) if diagnose_now else None
    memory = peak_memory(cfg.device) if measure else nullcontext()
    with memory as mem:
        t0 = clock(cfg.device)
        with record_layers() as layers:
            loss, metrics = task.loss(net, batch, cfg.forward_solver, est)
        t1 = clock(cfg.device)
        value = loss.item()
        nsteps, residual, diverged, why = _layer_stats(layers)
        forward = {M.TRAIN_LOSS: value, **{M.train_metric(k): v for k, v in metrics.items()},
                   M.SOLVER_NSTEPS: nsteps, M.SOLVER_REL_RESIDUAL: residual,
                   **_layer_rows(layers, cfg.f_stop_mode)}
        if d.active:  # every rank decides (divergence, logging) on the same, all-reduced values
            forward = distributed.reduce_values({**forward, "diverged": float(diverged)},
                                                _reduce_how(forward), d)
            value, residual = forward[M.TRAIN_LOSS], forward[M.SOLVER_REL_RESIDUAL]
            if forward.pop("diverged") and not diverged:
                diverged, why = True, "diverged on another rank"
        if diverged:  # the cause first: a diverged solve makes the loss non-finite too
            raise Divergence(f"forward solver: {why} at step {step}")
        if not math.isfinite(value):
            raise Divergence(f"non-finite loss {value} at step {step}")
        early = _early_loss(cfg, state)
        if early is not None and value > cfg.diverge_loss_factor * early:
            n = min(step, cfg.diverge_loss_window)
            raise Divergence(f"loss {value:.4g} > {cfg.diverge_loss_factor:g} x the early loss "
                             f"{early:.4g} ({'step 0' if n == 1 else f'mean of steps 0-{n - 1}'})"
                             f" at step {step}")
        if not pretraining and residual > cfg.diverge_residual:
            raise Divergence(f"forward residual {residual:.3g} > {cfg.diverge_residual:g} at "
                             f"step {step}")
        jr_row, jr_s = {M.JR_WEIGHT: jr.weight_at(step) if jr_now else 0.0}, 0.0
        if jr_now:  # Jacobian regularization at the recorded h* (JR paper; appendix §4.3)
            j0 = clock(cfg.device)
            penalty = jacobian_penalty(layers, jr.samples, jr.vector_generator(step))
            jr_row[M.JR_VALUE] = penalty.item()
            if not math.isfinite(jr_row[M.JR_VALUE]):
                raise Divergence(f"non-finite Jacobian penalty at step {step}")
            loss = loss + jr_row[M.JR_WEIGHT] * penalty
            jr_s = clock(cfg.device) - j0     # the penalty's forward counts as forward time
        opt.zero_grad(set_to_none=True)
        # Under DDP a diagnostics step keeps each rank's own gradient (no_sync) until rank 0
        # has compared its own with the reference on its own batch; then it is averaged.
        sync_later = d.active and diagnose_now
        with net.no_sync() if sync_later else nullcontext():
            loss.backward()
        if cfg.grad_clip and not sync_later:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        t2 = clock(cfg.device)
    row = {**forward, M.PRETRAINING: float(pretraining), **jr_row,
           **_backward_row(layers, step, d)}
    if not pretraining:
        row[M.TRAIN_LAM] = est.lam
    lam_s = 0.0
    if cfg.adaptive_lam_every and not pretraining \
            and (step - cfg.pretrain_steps) % cfg.adaptive_lam_every == 0:
        a0 = clock(cfg.device)
        lam = adaptive_lam(layers, cfg, step)
        if d.active:  # one lam on every rank: 1 / the largest rho over the ranks' batches
            lam = distributed.reduce_values({"lam": lam}, {"lam": distributed.MIN}, d)["lam"]
        state["adaptive_lam"] = lam
        lam_s = clock(cfg.device) - a0        # a cost of training: part of the step's time
    if diagnose_now and d.is_main:  # on the unwrapped module, rank 0 alone
        d0 = time.perf_counter()
        row.update(diagnose(model, task.loss, batch, layers, rng, diag_cfg, step))
        row[M.TIME_DIAGNOSTICS] = time.perf_counter() - d0
    if sync_later:
        distributed.average_gradients(model, d)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    del layers
    t3 = clock(cfg.device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:  # the same on every rank (averaged); never step on a non-finite gradient
        norm = torch.linalg.vector_norm(torch.stack([g.detach().norm() for g in grads])).item()
        if not math.isfinite(norm):
            raise Divergence(f"non-finite gradient norm {norm} at step {step}")
    opt.step()
    sched.step()
    t4 = clock(cfg.device)
    row[M.TRAIN_LR] = opt.param_groups[0]["lr"]
    if measure:  # this step ran under the memory counter, which slows every op: no times
        row[M.MEMORY_STEP_PEAK] = mem.peak_mb
        row["_train_s"] = 0.0
    else:
        row["_train_s"] = (t2 - t0) + (t4 - t3) + lam_s
        row.update({M.TIME_FORWARD: t1 - t0 + jr_s, M.TIME_BACKWARD: t2 - t1 - jr_s,
                    M.TIME_STEP: row["_train_s"]})
        if hasattr(task, "batch_tokens"):
            row[M.TOKENS_PER_S] = task.batch_tokens(batch) / row[M.TIME_STEP]
    return row


def _reduce_how(forward: dict) -> dict[str, str]:
    """How a forward's values combine over ranks: loss and task metrics by their mean (equal
    batches per rank), solver steps and residuals by the worst rank, convergence by all."""
    how = {k: distributed.MAX for k in forward
           if k != M.TRAIN_LOSS and not k.startswith(M.train_metric(""))}
    how.update({M.FORWARD_CONVERGED: distributed.MIN, "diverged": distributed.MAX})
    return how


def adaptive_lam(layers, cfg: TrainConfig, step: int) -> float:
    """lam = 1 / rho(dF/dh) at this step's h*, clipped to (0, 1] (appendix §4.3: NPG on
    PostLN trains with this damping). rho is the power method's, the largest over samples
    and layers, seeded by the step; the new lam is used from the next step on."""
    gen = torch.Generator(device=layers[0].h_star.device).manual_seed(cfg.seed * 1_000_003 + step)
    rho = max(spectral_radius(r.func, r.h_star, 1.0, cfg.power_iters, gen, cfg.power_tol)
              .rho.max().item() for r in layers)
    return min(1.0, 1.0 / rho) if rho > 0 else 1.0


def _early_loss(cfg: TrainConfig, state: dict) -> float | None:
    """The mean loss of the run's first ``diverge_loss_window`` steps (of all steps so far,
    while fewer ran, so an explosion at step 1 is caught), read from the kept rows: a
    resumed run has the same reference. None at step 0, when the rule is off
    (``diverge_loss_factor: null``), or when that loss is not positive."""
    early = [r[M.TRAIN_LOSS] for r in state["curves"][:cfg.diverge_loss_window]]
    if cfg.diverge_loss_factor is None or not early:
        return None
    mean = sum(early) / len(early)
    return mean if mean > 0 else None


def _flush(tracker, state: dict, metric: str) -> None:
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


def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else None


def _mean(values):
    return sum(values) / len(values) if values else None


def _results(cfg: TrainConfig, task, state: dict, status: str, reason: str, n_params: int) -> dict:
    from pipeline.tracking import git_commit
    hist, metric = state["history"], task.primary_metric
    trained = [r for r in state["curves"] if not r[M.PRETRAINING]]  # the estimator's steps
    timed = [r for r in trained if M.TIME_STEP in r]

    def mean(key):
        return sum(r[key] for r in timed) / len(timed) if timed else None

    diags = [r for r in trained if M.GRAD_REF_CONVERGED in r]
    good = [r for r in diags if r[M.GRAD_REF_CONVERGED] == 1.0]
    epochs = [h for h in hist if "epoch_s" in h]
    return {
        "status": status, "reason": reason, "git_commit": git_commit(), "task": cfg.task,
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


# --- CLI edge --------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--study", required=True, help="the study: the MLflow experiment")
    parser.add_argument("--name", required=True, help="the run, an entry of <study>.runs")
    parser.add_argument("--params", required=True, help="the merged run params, JSON")
    parser.add_argument("--data", required=True, help="the task's data directory")
    parser.add_argument("--out", required=True, help="results/<study>/<name>")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--scale", default="default")
    M.add_run_arguments(parser)
    parser.add_argument("--threads", type=int, default=0,
                        help="the job's threads; under torchrun each rank takes "
                             "max(1, threads // ranks)")


def config_from_args(args) -> tuple[dict, TrainConfig]:
    """(the run's params, its TrainConfig) from the CLI arguments; sets the thread count and
    refuses a CUDA device where none is visible. Shared by ``train`` and ``train-repeats``."""
    if args.threads:
        torch.set_num_threads(max(1, args.threads // distributed.from_env().world_size))
    params = json.loads(args.params)
    cfg = TrainConfig.from_params(params)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"{args.study} run {args.name}: device={cfg.device!r} but no CUDA "
                         "device is visible; run the paper scale on a GPU node (profiles/slurm) "
                         f"or set {args.study}.defaults.device: cpu")
    return params, cfg


def main(args) -> int:
    from pipeline import tracking
    from pipeline.config import params_hash
    from pipeline.io import prune_empty_dirs, write_csv, write_json

    import pandas as pd

    params, cfg = config_from_args(args)
    d = distributed.from_env()  # torchrun's ranks, or one process
    if d.world_size != cfg.nproc_per_node:  # its batch order and global batch depend on it
        raise SystemExit(f"{args.study} run {args.name}: nproc_per_node={cfg.nproc_per_node} "
                         f"but {d.world_size} rank(s) started; launch it with torchrun "
                         f"--standalone --nproc_per_node={cfg.nproc_per_node} (its rule does)")
    cfg = dataclasses.replace(cfg, device=distributed.init(d, cfg.device))
    phash = params_hash(params)
    checkpoint = Path(args.checkpoints) / args.study / args.name / phash / "last.pt"
    resume = load_checkpoint(checkpoint) if checkpoint.exists() else None
    run_id = resume.get("run_id") if resume else None
    task = get_task(cfg.task)(cfg.model, cfg.data, args.data, cfg.device, cfg.batch_size,
                              cfg.eval_batch_size, cfg.seed)
    tags = {"study": args.study, "run": args.name, "task": cfg.task, "scale": args.scale,
            "dataset": task.dataset, "params_hash": phash, "world_size": d.world_size,
            **json.loads(args.tags)}
    # Rank 0 alone talks to MLflow and writes results; the others train beside it.
    run = (tracking.start_run(args.tracking_uri, args.study, args.name, tags,
                              {"run": dataclasses.asdict(cfg), "study": args.study,
                               "name": args.name, "scale": args.scale,
                               "world_size": d.world_size},
                              args.artifacts, run_id=run_id,
                              batch_size=args.tracking_batch_size)
           if d.is_main else nullcontext(tracking.NullRun()))
    try:
        with run as tracker:
            out = Path(args.out)
            results = train(cfg, task, tracker, checkpoint,
                            log=(lambda msg: print(msg, flush=True)) if d.is_main
                            else (lambda msg: None), resume=resume,
                            weights=out / "model.pt", rank=d.rank, world_size=d.world_size)
            results.update(study=args.study, name=args.name, scale=args.scale,
                           params_hash=phash, mlflow_run_id=tracker.run_id,
                           world_size=d.world_size, tracking_s=M.store_seconds())
            if d.is_main:
                write_csv(pd.DataFrame(results.pop("curves")), out / "curves.csv")
                write_json(results, out / "metrics.json")
                tracker.log_artifact(out / "metrics.json")
                tracker.log_artifact(out / "curves.csv")
        distributed.barrier(d)  # every rank has finished with the checkpoint
        # The run has concluded: its checkpoint only served an interrupted job, and must not
        # turn a later forced rerun (say, after a code change) into a no-op resume.
        if d.is_main:
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
    finally:  # <checkpoints>/<study>/<name>/<hash>/ and above, where nothing was saved
        if d.is_main:
            prune_empty_dirs(checkpoint.parent, levels=4)
        distributed.shutdown(d)
    if not d.is_main:
        return 0
    print(f"{args.study}/{args.name}: {results['status']} {results['reason']} best "
          f"{results['primary_metric']} {results['best']}")
    return 0
