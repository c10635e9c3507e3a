"""Gradient diagnostics of one training step: the one routine every study uses.

Run on the step's own state, before the optimizer step: the same batch, the same
dropout masks (the RNG state of the step's forward is restored), the same h* (the
layer record of :func:`pipeline.deq.record_layers`), and the gradient the optimizer
is about to apply (``p.grad``, after clipping). What it measures:

* **Reference**: the exact implicit gradient *at the h* the forward solver found*
  (paper Eq. 4): a float64 copy of the model replays the forward at the recorded h*
  with the backward system (I - J^T) g = dL/dh solved per sample by restarted GMRES
  (``pipeline.deq.gmres``) to ``reference_tol``. Its worst per-sample relative residual
  is logged every time; a reference that misses its tolerance, or whose replayed F
  does not match the recorded one, is flagged (``grad/ref_converged`` = 0), and its
  cosine must not be read as trustworthy. The forward residual at h* is logged beside
  it: where it is large, the "exact" gradient is exact for a point that is not a fixed
  point.
* **Cosine** of the applied gradient with the reference over the whole model and per
  part (``F``, ``injection``, ``head``, from the model's ``parts()``); the head's
  gradient is the same for every estimator, so the whole-model cosine overstates
  agreement. L1 norms of both.
* **Backward time** from h* to the parameter gradients, for this estimator and for
  implicit differentiation with the run's backward budget, on the same inputs: one
  warm-up each, then the median of ``timing_repeats`` repeats, alternating which
  goes first.
* **Spectral radii** rho(dF/dh) and rho(dF_lam/dh) at h* by the power method, with the
  iterations used and whether the estimate settled.

After training, :func:`measure_spectral` measures the same spectral radii of the trained
model on evaluation batches (``spectral_batches``).

Nothing here changes training: the global RNG is forked and restored, BatchNorm
buffers are restored, and ``p.grad`` is read, never written.

Under DDP (``torchrun``, :mod:`.distributed`) the loop runs a diagnostics step's backward
under ``no_sync()``, so ``p.grad`` is rank 0's own gradient on its own batch, the batch the
replays see; rank 0 alone runs these diagnostics, on the unwrapped module, and the loop
averages the gradients over ranks afterwards (then clips). The cosine is thus rank 0's
local gradient against rank 0's local reference.
"""
from __future__ import annotations

import copy
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline import tracking as M
from pipeline.deq import (EstimatorConfig, LayerRecord, SolverConfig, record_layers,
                          replay_layers, spectral_radius)

Tensor = torch.Tensor

REPLAY_MISMATCH_TOL = 1e-4  # float32 record vs float64 replay of F(h*); a wrong mask gives O(1)


@dataclass(frozen=True)
class DiagnosticsConfig:
    """How one diagnostics call works; built by the loop from its TrainConfig (the values
    come from params.yaml, so there are no defaults here to contradict it)."""

    forward_solver: SolverConfig
    estimator: EstimatorConfig          # the run's
    implicit: EstimatorConfig           # implicit with the run's backward budget
    reference: EstimatorConfig          # implicit, GMRES, float64, tight
    lam: float
    timing_repeats: int
    power_iters: int
    power_tol: float
    seed: int = 0
    device: str = "cpu"


def clock(device: str) -> float:
    """Wall time after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a (nested) batch cast to ``dtype``; everything else as is."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_batch(b, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    return batch


def part_names(model) -> dict[str, list[str]]:
    """Parameter names per part of the model (``model.parts()``), in named_parameters order."""
    parts = model.parts() if hasattr(model, "parts") else {}
    out = {}
    for part, module in parts.items():
        ids = {id(p) for p in module.parameters()}
        out[part] = [n for n, p in model.named_parameters() if id(p) in ids and p.requires_grad]
    return out


def _flat(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[n].reshape(-1).double() for n in names])


def _cos(a: Tensor, b: Tensor) -> float:
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


class _Restore:
    """Fork the global RNG at ``rng_state`` (the step's forward) and restore it, and the
    model's buffers, afterwards."""

    def __init__(self, model, rng_state: dict, device: str):
        self.model, self.rng_state, self.device = model, rng_state, device

    def __enter__(self):
        devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        set_rng_state(self.rng_state)
        self.buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(self.buffers[k])
        return self.fork.__exit__(*exc)


def rng_state(device: str) -> dict:
    """The global RNG state (CPU and, on CUDA, every device's), as plain tensors."""
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def replay_grads(model, loss_fn: Callable, batch, layers: list[LayerRecord],
                 estimator: EstimatorConfig, rng: dict, device: str,
                 solver: SolverConfig, penalty: Callable | None = None
                 ) -> tuple[dict[str, Tensor], float, list, list]:
    """Parameter gradients of the step's loss with ``estimator`` at the recorded h*; with
    ``penalty`` (the step's weighted Jacobian penalty, a function of a layer record), of
    the loss plus the penalty at the replayed F and h*, as the step's own gradient.

    Returns (grads by name, seconds from the first implicit layer to the gradients,
    the backward SolverStats, the replayed F of each layer).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backward_stats, started = [], []
    with _Restore(model, rng, device):
        with replay_layers(layers, estimator, backward_stats, started) as replay:
            loss, _ = loss_fn(model, batch, solver, estimator)
        if penalty is not None:
            dtype = named[0][1].dtype
            replayed = [LayerRecord(f, rec.h_star.detach().to(dtype), rec.stats)
                        for f, rec in zip(replay.funcs, layers)]
            loss = loss + penalty(replayed)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        done = clock(device)
    out = {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}
    return out, done - started[0], backward_stats, replay.funcs


def diagnose(model, loss_fn: Callable, batch, layers: list[LayerRecord], rng: dict,
             cfg: DiagnosticsConfig, step: int, penalty: Callable | None = None
             ) -> dict[str, float]:
    """The metrics of one diagnostics call (names from :mod:`pipeline.tracking`).

    ``loss_fn(model, batch, solver, estimator) -> (loss, metrics)`` is the task's loss;
    ``rng`` the RNG state taken just before the step's forward; ``layers`` that
    forward's layer record. Reads the applied gradient from ``p.grad`` (after clipping:
    the cosine does not change with it, the L1 norms are the clipped gradient's).
    ``penalty``, on a step that drew the Jacobian penalty, is that term as a function of a
    layer record (its weight and the step's probe vectors): the reference then solves for
    the gradient of the loss plus the penalty, as the applied gradient is. The backward
    times compare the estimators on the task's loss alone.
    """
    if not layers:
        raise ValueError("diagnostics need a layer record: the step solved no implicit layer")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    applied = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
               for n, p in named}
    out: dict[str, float] = {}

    # Reference: float64 replay at the recorded h*, GMRES backward.
    model64 = copy.deepcopy(model).double()
    ref, _, ref_stats, funcs64 = replay_grads(model64, loss_fn, cast_batch(batch, torch.float64),
                                              layers, cfg.reference, rng, cfg.device,
                                              cfg.forward_solver, penalty)
    mismatch = 0.0
    with torch.no_grad():
        for record, f64 in zip(layers, funcs64):
            f32 = record.func(record.h_star)
            diff = (f64(record.h_star.double()) - f32.double()).norm() / f32.norm().clamp_min(1e-30)
            mismatch = max(mismatch, diff.item())
    del model64
    solved = all(s.converged for s in ref_stats)
    out[M.GRAD_REF_REL_RESIDUAL] = max(max(s.sample_rel_residual, default=s.rel_residual)
                                       for s in ref_stats)
    out[M.GRAD_REF_NSTEPS] = float(sum(s.nstep for s in ref_stats))
    out[M.GRAD_REF_REPLAY_MISMATCH] = mismatch
    out[M.GRAD_REF_CONVERGED] = float(solved and mismatch <= REPLAY_MISMATCH_TOL)

    names = [n for n, _ in named]
    a, r = _flat(applied, names), _flat(ref, names)
    out[M.GRAD_COS] = _cos(a, r)
    for part, pnames in part_names(model).items():
        if pnames:
            out[M.GRAD_COS_PART.format(part=part)] = _cos(_flat(applied, pnames), _flat(ref, pnames))
    out[M.GRAD_NORM_L1] = a.abs().sum().item()
    out[M.GRAD_REF_NORM_L1] = r.abs().sum().item()

    # Forward residual at this h*.
    out[M.FORWARD_CONVERGED] = float(all(rec.stats.converged for rec in layers))

    # Backward time from h*: this estimator and implicit (b_thres), alternating, median.
    out.update(_time_backwards(model, loss_fn, batch, layers, rng, cfg))

    # Spectral radii at h* (worst layer), with the generator of this step.
    gen = torch.Generator(device=layers[0].h_star.device).manual_seed(cfg.seed * 1_000_003 + step)
    for lam, keys in ((1.0, (M.RHO, M.RHO_ITERS, M.RHO_SETTLED, M.RHO_CHANGE)),
                      (cfg.lam, (M.RHO_LAMBDA, M.RHO_LAMBDA_ITERS, M.RHO_LAMBDA_SETTLED,
                                 M.RHO_LAMBDA_CHANGE))):
        ests = [spectral_radius(rec.func, rec.h_star, lam, cfg.power_iters, gen, cfg.power_tol)
                for rec in layers]
        rho, iters, settled, change = keys
        out[rho] = max(e.rho.mean().item() for e in ests)
        out[iters] = float(max(e.iters for e in ests))
        out[settled] = float(all(e.settled for e in ests))
        out[change] = max(e.change for e in ests)
    return out


def _time_backwards(model, loss_fn, batch, layers, rng, cfg: DiagnosticsConfig) -> dict:
    used = cfg.estimator
    if used.effective.name in ("unrolled", "bptt"):
        return {}  # these have no h* to start from
    same = used.name == "implicit" and used.backward_solver == cfg.implicit.backward_solver
    estimators = [used] if same else [used, cfg.implicit]
    times: list[list[float]] = [[] for _ in estimators]
    implicit_stats: list = []
    for rep in range(cfg.timing_repeats + 1):        # repeat 0 is the warm-up
        order = range(len(estimators)) if rep % 2 == 0 else reversed(range(len(estimators)))
        for i in order:
            _, seconds, stats, _ = replay_grads(model, loss_fn, batch, layers, estimators[i],
                                                rng, cfg.device, cfg.forward_solver)
            if rep:
                times[i].append(seconds)
            if i == len(estimators) - 1:
                implicit_stats = stats
    used_s = statistics.median(times[0])
    implicit_s = used_s if same else statistics.median(times[1])
    # The speedup's reference: did its backward solve meet b_tol within b_thres?
    return {M.TIME_GRAD: used_s, M.TIME_GRAD_IMPLICIT: implicit_s,
            M.GRAD_SPEEDUP: implicit_s / used_s,
            M.GRAD_IMPLICIT_REL_RESIDUAL: max((s.rel_residual for s in implicit_stats),
                                              default=float("nan")),
            M.GRAD_IMPLICIT_CONVERGED: float(bool(implicit_stats)
                                             and all(s.converged for s in implicit_stats))}


def measure_spectral(task, model, cfg: DiagnosticsConfig, batches: int) -> dict:
    """After training: rho(dF/dh) and rho(dF_lam/dh) at the h* of the trained model on the
    first ``batches`` evaluation batches (eval mode), by the power method with
    ``power_iters`` / ``power_tol``, lam = the run's ``lam`` (appendix §4.3: rho_lam stays
    near 1 while rho often exceeds 1). Per sample, the worst layer; then the mean over
    samples (``rho``, ``rho_lambda``), their largest values, and whether every estimate
    settled (a complex leading pair never settles: then rho is only a rough value)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    rho, rho_lam, settled, samples = [], [], True, 0
    for batch in itertools.islice(task.batches(task.eval_split, 0), batches):
        with torch.no_grad(), record_layers() as layers:
            task.loss(model, batch, cfg.forward_solver, cfg.estimator)
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
