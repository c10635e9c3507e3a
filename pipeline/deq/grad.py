"""Gradient estimators for an implicit layer h* = F(h*, z).

Each estimator is a drop-in way to run the layer in training; it is chosen by
name plus explicit fields (:class:`EstimatorConfig`):

=========== ==================================================================
``implicit`` implicit differentiation: the backward solves
             g = (dF/dh)^T g + dL/dh with a backward solver (paper Eq. 4).
``exact``    the same linear system solved by a dense solve (small problems).
``upg``      unrolling-based phantom gradient A_{k,lam} (appendix Alg. 1):
             k damped steps h <- (1-lam) h + lam F(h, z) under autograd,
             from the no-grad solution. Memory O(k).
``npg``      Neumann-series phantom gradient (appendix Alg. 2 and 3):
             a custom backward, O(1) memory in k.
``jfb``      Jacobian-free backprop, UPG with k = 1, lam = 1.
``bptt``     backpropagation through the whole forward fixed-point unroll.
``unrolled`` MDEQ's pretraining mode: k weight-tied applications of F from h0.
=========== ==================================================================

>>> import torch
>>> from pipeline.deq import SolverConfig, EstimatorConfig, implicit_layer
>>> W = torch.nn.Parameter(0.3 * torch.eye(4))
>>> u = torch.randn(2, 4)
>>> h, stats = implicit_layer(lambda h: torch.tanh(h @ W + u), torch.zeros(2, 4),
...                           SolverConfig("broyden", 30, 1e-8), EstimatorConfig("upg", k=5, lam=0.5))
>>> h.sum().backward(); W.grad.shape
torch.Size([4, 4])

The func passed in is a closure F(h) over z and the module's parameters; the
estimators only need F's vector-Jacobian products, never a dense Jacobian
(``exact`` aside).

Layer record: inside ``with record_layers() as layers``, every ``implicit_layer``
that solves appends a :class:`LayerRecord` (F, h*, forward stats). Inside
``with replay_layers(layers, estimator)``, the same forward, run again, skips each
solve, takes the recorded h* and attaches ``estimator`` instead: diagnostics,
spectral radii and Jacobian regularisation then work on any model, stacks of
implicit layers included, without knowing its internals.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .config import PHANTOMS, EstimatorConfig, SolverConfig
from .solvers import SolverStats, residuals, solve

Tensor = torch.Tensor
Func = Callable[[Tensor], Tensor]

class _BackwardHook(torch.autograd.Function):
    """Identity in the forward; the backward replaces the incoming gradient by ``fn(grad)``.

    Used to attach a custom backward solve to ``y = F(h*)``: autograd then carries
    the solved gradient on through F's graph to z and the parameters.
    """

    @staticmethod
    def forward(ctx, y: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.fn = fn
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.fn(grad), None


def _vjp(y: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """v^T dy/dx through a retained graph."""
    return torch.autograd.grad(y, x, v, retain_graph=True)[0]


def _damped(func: Func, h: Tensor, lam) -> Tensor:
    """(1-lam) h + lam F(h); F(h) itself for a float lam = 1. A tensor ``lam`` (one damping
    per sample, e.g. shape (B, 1)) lets one batch hold several lam side by side."""
    if not isinstance(lam, Tensor) and lam == 1.0:
        return func(h)
    return (1 - lam) * h + lam * func(h)


def _attach_backward(func: Func, h_star: Tensor, lam, backward: Callable) -> Tensor:
    """y = (1-lam) h* + lam F(h*), with ``backward(y, h, grad)`` giving the vector y passes on."""
    h = h_star.detach().requires_grad_()
    y = _damped(func, h, lam)
    return _BackwardHook.apply(y, lambda grad: backward(y, h, grad))


def implicit_backward(backward_solver: SolverConfig, stats_out: list | None = None):
    """Backward of implicit differentiation: solve g = J^T g + grad (paper Eq. 4)."""

    def backward(y: Tensor, h: Tensor, grad: Tensor) -> Tensor:
        g, stats = solve(lambda g: _vjp(y, h, g) + grad, torch.zeros_like(grad), backward_solver)
        if stats_out is not None:
            stats_out.append(stats)
        return g

    return backward


def neumann_backward(k: int):
    """Alg. 3: g_hat = sum_{t<k} (B^T)^t grad with B = dF_lam/dh, by k-1 VJPs.

    Appendix Alg. 2 writes ``g_out = lambda_ * grad(f, z, g_hat)`` with f already
    damped; the factor lambda enters once (Theorem 2, Eq. A-10), here through
    y = (1-lam) h + lam F(h), so UPG and NPG agree at an exact fixed point.
    """

    def backward(y: Tensor, h: Tensor, grad: Tensor) -> Tensor:
        g_hat = grad
        for _ in range(k - 1):
            g_hat = grad + _vjp(y, h, g_hat)
        return g_hat

    return backward


def dense_backward(y: Tensor, h: Tensor, grad: Tensor) -> Tensor:
    """Solve (I - J^T) g = grad with the dense Jacobian J = dF/dh, per sample.

    Assumes samples (dim 0) do not interact inside F, as in every model here.
    The Jacobian of each sample is built from n VJPs, one per coordinate,
    taken for the whole batch at once.
    """
    return dense_solve(dense_jacobian(y, h), grad)


def dense_jacobian(y: Tensor, h: Tensor) -> Tensor:
    """J = dy/dh per sample, shape (B, n, n) with n = h[0].numel(), from n VJPs.

    Assumes samples (dim 0) do not interact inside y; each VJP serves the whole batch.
    """
    bsz, n = h.shape[0], h[0].numel()
    if n > 8192:
        raise ValueError(f"exact estimator: {n} unknowns per sample is too many for a dense "
                         "solve; use 'implicit' with a tight b_tol")
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    rows = [_vjp(y, h, eye[i].expand(bsz, n).reshape_as(y)).reshape(bsz, n) for i in range(n)]
    return torch.stack(rows, dim=1)  # rows[i] = e_i^T J: row i of J


def dense_solve(J: Tensor, grad: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """g with (I - J^T) g = grad per sample (paper Eq. 4), J of shape (B, n, n); the LU solve
    runs in ``dtype`` (default: J's) and g comes back in grad's dtype and shape."""
    bsz, n = J.shape[0], J.shape[1]
    dtype = dtype or J.dtype
    A = torch.eye(n, dtype=dtype, device=J.device) - J.transpose(1, 2).to(dtype)
    g = torch.linalg.solve(A, grad.reshape(bsz, n, 1).to(dtype))
    return g.to(grad.dtype).reshape_as(grad)


def unroll(func: Func, h0: Tensor, steps: int, lam=1.0) -> Tensor:
    """``steps`` damped applications of F under autograd: h <- (1-lam) h + lam F(h);
    ``lam`` a float or a per-sample tensor (see :func:`attach_phantom`)."""
    h = h0
    for _ in range(steps):
        h = _damped(func, h, lam)
    return h


@dataclass
class LayerRecord:
    """One implicit layer of a forward: F (a closure over its input and parameters), the
    no-grad solution h*, the forward solver's stats, and (filled by ``backward()``) the
    implicit backward solve's stats."""

    func: Func
    h_star: Tensor
    stats: SolverStats
    backward_stats: list = field(default_factory=list)


@dataclass
class _Replay:
    layers: list[LayerRecord]
    estimator: EstimatorConfig
    backward_stats: list
    started: list = field(default_factory=list)   # perf_counter() when the first layer ran
    funcs: list = field(default_factory=list)     # the replayed F of each layer
    index: int = 0


_RECORDING: list[list[LayerRecord]] = []
_REPLAYING: list[_Replay] = []


@contextmanager
def record_layers() -> Iterator[list[LayerRecord]]:
    """Collect a :class:`LayerRecord` for every solving ``implicit_layer`` in the block."""
    layers: list[LayerRecord] = []
    _RECORDING.append(layers)
    try:
        yield layers
    finally:
        _RECORDING.remove(layers)


@contextmanager
def replay_layers(layers: list[LayerRecord], estimator: EstimatorConfig,
                  backward_stats: list | None = None, started: list | None = None):
    """Run a forward again at the recorded h*, with ``estimator`` attached to each layer.

    The caller must rebuild F exactly as recorded (same inputs, parameters and dropout
    masks: restore the RNG state of the recorded forward). h* is cast to the dtype and
    device of the replayed layer's h0, so a float64 copy of the model can replay a
    float32 record. ``backward_stats`` collects ``implicit``'s backward SolverStats;
    ``started`` gets the clock time at which the first layer was reached, so the time
    from h* to the gradients can be taken.
    """
    replay = _Replay(layers, estimator, backward_stats if backward_stats is not None else [],
                     started if started is not None else [])
    _REPLAYING.append(replay)
    try:
        yield replay
    finally:
        _REPLAYING.remove(replay)
    if replay.index != len(layers):
        raise RuntimeError(f"replay ran {replay.index} implicit layers, the record has "
                           f"{len(layers)}")


def _replayed(func: Func, h0: Tensor) -> Tensor:
    replay = _REPLAYING[-1]
    if replay.index >= len(replay.layers):
        raise RuntimeError(f"replay reached implicit layer {replay.index + 1}; the record has "
                           f"{len(replay.layers)}")
    if not replay.started:
        if h0.is_cuda:  # the clock starts once the work before h* is done
            torch.cuda.synchronize(h0.device)
        replay.started.append(time.perf_counter())
    record = replay.layers[replay.index]
    replay.index += 1
    replay.funcs.append(func)
    h_star = record.h_star.detach().to(dtype=h0.dtype, device=h0.device)
    return attach_estimator(func, h_star, replay.estimator, replay.backward_stats)


def implicit_layer(func: Func, h0: Tensor, solver: SolverConfig, estimator: EstimatorConfig,
                   training: bool = True, backward_stats: list | None = None
                   ) -> tuple[Tensor, SolverStats]:
    """Run an implicit layer h* = F(h*) with the gradient ``estimator``.

    Args:
        func: F as a closure over the input injection z and the parameters.
        h0: initial state, shape (B, ...).
        solver: forward solver (MDEQ: Broyden, f_thres).
        estimator: how the backward is formed.
        training: in eval mode (or with grad disabled) only the no-grad solve runs.
        backward_stats: if a list, ``implicit`` appends the backward SolverStats to it.

    Returns:
        (h, stats): the layer output, with the graph the estimator needs, and the
        forward solver's stats (``unrolled`` reports no solve: nstep 0).
    """
    est = estimator.effective
    if _REPLAYING:
        return _replayed(func, h0), SolverStats()
    if est.name == "unrolled":
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            return unroll(func, h0, est.k), SolverStats()
    if est.name == "bptt" and training and torch.is_grad_enabled():
        return _bptt(func, h0, solver)

    with torch.no_grad():
        h_star, stats = solve(func, h0, solver)
    record = LayerRecord(func, h_star, stats)
    for layers in _RECORDING:
        layers.append(record)
    if not (training and torch.is_grad_enabled()):
        if est.eval_unroll:  # appendix §2: damped steps after the solve, at test time
            with torch.no_grad():
                h_star = unroll(func, h_star, est.eval_unroll, est.lam)
        return h_star, stats
    return attach_estimator(func, h_star, est, record.backward_stats
                            if backward_stats is None else backward_stats), stats


def attach_estimator(func: Func, h_star: Tensor, estimator: EstimatorConfig,
                     backward_stats: list | None = None) -> Tensor:
    """Given a no-grad solution h*, return the output whose backward is ``estimator``'s.

    Lets several estimators share one forward solve (the synthetic study and
    the training diagnostics compare them on the same h*).
    """
    est = estimator.effective
    if est.name in ("upg", "npg"):
        return attach_phantom(func, h_star, est.name, est.k, est.lam)
    if est.name == "implicit":
        back = implicit_backward(est.backward_solver, backward_stats)
        return _attach_backward(func, h_star, 1.0, back)
    if est.name == "exact":
        return _attach_backward(func, h_star, 1.0, dense_backward)
    raise ValueError(f"estimator {est.name!r} needs the forward unroll; use implicit_layer")


def attach_phantom(func: Func, h_star: Tensor, name: str, k: int, lam) -> Tensor:
    """The phantom gradient A_{k,lam} at h*: ``upg`` (Alg. 1) or ``npg`` (Alg. 2 / 3).

    ``lam`` is a float, or a tensor broadcastable against h* holding one damping per
    sample: several lam then share one unroll, stacked along the batch axis, and each
    sample's gradient is the one its own lam would give alone (samples do not interact
    in F). :func:`attach_estimator` is the validated entry point for one lam.
    """
    if name == "upg":  # Alg. 1
        return unroll(func, h_star.detach(), k, lam)
    if name == "npg":  # Alg. 2 / 3
        return _attach_backward(func, h_star, lam, neumann_backward(k))
    raise ValueError(f"phantom gradient {name!r} is not one of {list(PHANTOMS)}")


def _bptt(func: Func, h0: Tensor, solver: SolverConfig) -> tuple[Tensor, SolverStats]:
    """Fixed-point iteration under autograd, stopped like the forward solver."""
    stats = SolverStats()
    h = h0
    for step in range(solver.max_iter + 1):
        fh = func(h)
        with torch.no_grad():
            abs_res, rel_res, inf_res = residuals(h, fh, solver.stop_mode == "inf")
        stats.abs_trace.append(abs_res)
        stats.rel_trace.append(rel_res)
        stats.nstep = stats.best_step = step
        stats.abs_residual, stats.rel_residual, stats.inf_residual = abs_res, rel_res, inf_res
        if solver.stop_mode == "inf":
            stats.inf_trace.append(inf_res)
        value = {"rel": rel_res, "abs": abs_res, "inf": inf_res}[solver.stop_mode]
        if not (math.isfinite(value) and math.isfinite(abs_res) and math.isfinite(rel_res)):
            stats.diverged, stats.reason = True, f"non-finite residual at step {step}"
            break
        if value <= solver.tol:
            stats.converged = True
            break
        h = fh
    return fh, stats
