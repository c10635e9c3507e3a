"""One training step, its row of metrics, and the rules that stop a divergent run.

:func:`train_step` runs the forward solve (the task's loss under the estimator, or the
task's pretraining estimator during ``pretrain_steps``), the divergence checks, the
Jacobian penalty on its seeded steps, the backward, the diagnostics on their steps, the
adaptive lambda on its steps and the optimizer step. Its row (names from
:mod:`pipeline.tracking`) holds the loss, the task's training metric, the learning rate,
the forward solver's steps and residual at h* (relative, and in the solver's own stop
norm; per layer for a stack of implicit layers), the backward solve's residual and
steps, and the step's forward / backward / total time. The first estimator step of an
epoch is measured for tensor memory instead of time (the CPU counter slows every op).

After every ``diagnostics_every`` steps the diagnostics of :mod:`.diagnostics` run on
the step's own state, before the optimizer step, on the gradient the optimizer then
applies; they are timed on their own and fork the RNG, so they never change training.
``jacobian_reg`` adds the Jacobian penalty of :mod:`pipeline.deq.jacobian` at the step's
recorded h* (its forward counted as forward time); ``adaptive_lam_every`` sets the
estimator's lambda to 1/rho(dF/dh) (power method at h*, clipped to (0, 1]) every N
estimator steps, used from the next step on and kept in the checkpoint.

A divergence raises :class:`Divergence`, whose message is the reason MLflow and
``metrics.json`` record: a non-finite loss, a diverged forward or backward solve, a
forward residual past ``diverge_residual``, a loss past ``diverge_loss_factor`` times the
mean loss of the first ``diverge_loss_window`` steps, a non-finite Jacobian penalty or
gradient, or (:func:`check_capped`, at epoch ends, with ``diverge_capped_epochs``) a
forward solve at its cap for that many epochs + 1, its residual grown 10x.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext

import torch

from pipeline import tracking as M
from pipeline.deq import jacobian_penalty, record_layers, spectral_radius
from pipeline.experiments import distributed
from pipeline.experiments.diagnostics import DiagnosticsConfig, clock, diagnose, rng_state
from pipeline.experiments.train_config import TrainConfig
from pipeline.memory import peak_memory


class Divergence(RuntimeError):
    """Training diverged; the message is the reason recorded in MLflow and metrics.json."""


def train_step(cfg: TrainConfig, task, model, opt, sched, batch, state: dict,
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
        # on a JR step the reference gradient includes the same penalty (weight, vectors)
        jr_term = ((lambda recs: jr_row[M.JR_WEIGHT]
                    * jacobian_penalty(recs, jr.samples, jr.vector_generator(step)))
                   if jr_now else None)
        row.update(diagnose(model, task.loss, batch, layers, rng, diag_cfg, step, jr_term))
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


CAPPED_GROWTH = 10.0  # the collapse rule's residual growth over its window of epochs


def check_capped(cfg: TrainConfig, state: dict, steps_per_epoch: int) -> None:
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

