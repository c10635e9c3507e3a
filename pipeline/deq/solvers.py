"""Batched root solvers for h* = F(h*), run under ``torch.no_grad()``.

Every solver has one signature::

    solver(f, x0, max_iter, tol, stop_mode="rel", callback=None, **options) -> (x_best, SolverStats)

``f`` maps a tensor of any shape ``(B, ...)`` to one of the same shape. The
residual is taken over the whole batch, as in MDEQ:
``abs = ||F(x) - x||`` and ``rel = abs / ||F(x)||``.

>>> import torch
>>> W = 0.5 * torch.eye(3)
>>> h, stats = broyden(lambda h: h @ W + 1.0, torch.zeros(2, 3), max_iter=20, tol=1e-8)
>>> bool(stats.converged), round(float(h[0, 0]), 4)
(True, 2.0)

A solve that meets NaN or Inf stops there, sets ``stats.diverged`` and returns
the best finite iterate; a solve that runs out of iterations returns its best
iterate (lowest residual, not the last) with ``stats.converged = False``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Tensor = torch.Tensor
StepCallback = Callable[[int, Tensor], None]

STOP_MODES = ("abs", "rel")


@dataclass
class SolverStats:
    """What a solve did.

    Attributes:
        nstep: number of F evaluations after the initial one.
        abs_trace / rel_trace: residual of every iterate, index 0 is x0.
        best_step: index (into the traces) of the returned iterate.
        abs_residual / rel_residual: residual of the returned iterate.
        converged: the tolerance was met.
        diverged: a NaN or Inf was met; ``reason`` says where.
    """

    nstep: int = 0
    abs_trace: list[float] = field(default_factory=list)
    rel_trace: list[float] = field(default_factory=list)
    best_step: int = 0
    abs_residual: float = math.inf
    rel_residual: float = math.inf
    converged: bool = False
    diverged: bool = False
    reason: str = ""


@dataclass(frozen=True)
class SolverConfig:
    """A solver chosen by name, with its budget.

    Args:
        name: one of ``SOLVERS`` (``fixed_point``, ``anderson``, ``broyden``).
        max_iter: cap on iterations (MDEQ's f_thres / b_thres).
        tol: residual tolerance.
        stop_mode: ``rel`` (||F(h)-h|| / ||F(h)||) or ``abs``.
        damping: fixed-point damping beta in h <- (1-beta) h + beta F(h); Anderson's beta.
        memory: Anderson's history size m.
    """

    name: str = "broyden"
    max_iter: int = 30
    tol: float = 1e-5
    stop_mode: str = "rel"
    damping: float = 1.0
    memory: int = 5

    def __post_init__(self) -> None:
        get_solver(self.name)
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode={self.stop_mode!r}; expected one of {STOP_MODES}")
        if self.max_iter < 0:
            raise ValueError(f"max_iter={self.max_iter} must be >= 0")


class _Tracker:
    """Residual bookkeeping shared by all solvers: traces, best iterate, stopping."""

    def __init__(self, tol: float, stop_mode: str, callback: Optional[StepCallback]):
        self.tol, self.stop_mode, self.callback = tol, stop_mode, callback
        self.stats = SolverStats()
        self.best: Optional[Tensor] = None
        self._best_value = math.inf

    def record(self, step: int, x: Tensor, fx: Tensor) -> bool:
        """Record iterate ``x`` with value ``fx = F(x)``; return True to stop."""
        abs_res = torch.linalg.vector_norm(fx - x).item()
        rel_res = abs_res / (torch.linalg.vector_norm(fx).item() + 1e-12)
        if not (math.isfinite(abs_res) and math.isfinite(rel_res)):
            self.stats.diverged = True
            self.stats.reason = f"non-finite residual at step {step}"
            return True
        s = self.stats
        s.nstep = step
        s.abs_trace.append(abs_res)
        s.rel_trace.append(rel_res)
        value = rel_res if self.stop_mode == "rel" else abs_res
        if value < self._best_value or self.best is None:
            self._best_value = value
            self.best = x.clone()
            s.best_step, s.abs_residual, s.rel_residual = step, abs_res, rel_res
        if self.callback is not None:
            self.callback(step, x)
        if value <= self.tol:
            s.converged = True
            return True
        return False

    def finish(self, x0: Tensor) -> tuple[Tensor, SolverStats]:
        if not self.stats.converged and not self.stats.diverged:
            self.stats.reason = (f"tolerance {self.tol:g} ({self.stop_mode}) not met in "
                                 f"{self.stats.nstep} steps; best {self._best_value:.3e}")
        return (self.best if self.best is not None else x0.clone()), self.stats


@torch.no_grad()
def fixed_point(f, x0, max_iter, tol, stop_mode="rel", callback=None, damping=1.0, **_):
    """(Damped) fixed-point iteration h <- (1 - beta) h + beta F(h)."""
    track = _Tracker(tol, stop_mode, callback)
    x = x0
    fx = f(x)
    for step in range(max_iter + 1):
        if track.record(step, x, fx) or step == max_iter:
            break
        x = (1 - damping) * x + damping * fx
        fx = f(x)
    return track.finish(x0)


@torch.no_grad()
def anderson(f, x0, max_iter, tol, stop_mode="rel", callback=None, memory=5, damping=1.0,
             reg=1e-4, **_):
    """Anderson acceleration (type II), batched per sample.

    Keeps the last ``memory`` pairs (x_i, F(x_i)) and mixes them with weights
    alpha that minimise ||sum_i alpha_i (F(x_i) - x_i)|| subject to sum alpha = 1
    (Walker & Ni, 2011), with Tikhonov regulariser ``reg``.
    """
    bsz = x0.shape[0]
    shape = x0.shape
    n = x0[0].numel()
    m = max(1, memory)
    X = x0.new_zeros(bsz, m, n)
    FX = x0.new_zeros(bsz, m, n)
    track = _Tracker(tol, stop_mode, callback)
    x = x0
    fx = f(x)
    for step in range(max_iter + 1):
        if track.record(step, x, fx) or step == max_iter:
            break
        slot = step % m
        X[:, slot] = x.reshape(bsz, n)
        FX[:, slot] = fx.reshape(bsz, n)
        used = min(step + 1, m)
        G = FX[:, :used] - X[:, :used]  # (B, used, n) residuals
        H = torch.bmm(G, G.transpose(1, 2))
        H = H + reg * torch.eye(used, dtype=x0.dtype, device=x0.device)
        # Solve [0 1^T; 1 H] [nu; alpha] = [1; 0] per sample.
        A = x0.new_zeros(bsz, used + 1, used + 1)
        A[:, 0, 1:] = 1
        A[:, 1:, 0] = 1
        A[:, 1:, 1:] = H
        rhs = x0.new_zeros(bsz, used + 1, 1)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(A, rhs)[:, 1:, 0]  # (B, used)
        mixed_f = torch.einsum("bu,bun->bn", alpha, FX[:, :used])
        mixed_x = torch.einsum("bu,bun->bn", alpha, X[:, :used])
        x = (damping * mixed_f + (1 - damping) * mixed_x).reshape(shape)
        fx = f(x)
    return track.finish(x0)


def _inv_jac_matvec(Us: Tensor, VTs: Tensor, v: Tensor) -> Tensor:
    """H v with H = -I + sum_i u_i v_i^T; Us and VTs are (B, rank, n).

    Written as row-vector products (B, 1, .) @ (B, ., .), which CPU BLAS runs several
    times faster than the equivalent batched matrix-vector products.
    """
    coeff = torch.bmm(v.unsqueeze(1), VTs.transpose(1, 2))       # (B, 1, rank): v_i^T v
    return -v + torch.bmm(coeff, Us).squeeze(1)


def _inv_jac_rmatvec(Us: Tensor, VTs: Tensor, v: Tensor) -> Tensor:
    """v^T H with H = -I + sum_i u_i v_i^T."""
    coeff = torch.bmm(v.unsqueeze(1), Us.transpose(1, 2))        # (B, 1, rank): v^T u_i
    return -v + torch.bmm(coeff, VTs).squeeze(1)


@torch.no_grad()
def broyden(f, x0, max_iter, tol, stop_mode="rel", callback=None, **_):
    """Broyden's ("good") method on g(x) = F(x) - x, batched per sample, as in MDEQ.

    The inverse Jacobian of g starts at -I and takes one rank-one update a step:
    H <- H + (dx - H dg) dx^T H / (dx^T H dg). Full steps, no line search.
    """
    bsz = x0.shape[0]
    shape = x0.shape
    n = x0[0].numel()
    cap = max(1, max_iter)
    Us = x0.new_zeros(bsz, cap, n)
    VTs = x0.new_zeros(bsz, cap, n)
    track = _Tracker(tol, stop_mode, callback)
    x = x0.reshape(bsz, n)
    fx = f(x0).reshape(bsz, n)
    gx = fx - x
    for step in range(max_iter + 1):
        if track.record(step, x.reshape(shape), fx.reshape(shape)) or step == max_iter:
            break
        dx = -_inv_jac_matvec(Us[:, :step], VTs[:, :step], gx)
        x_new = x + dx
        fx = f(x_new.reshape(shape)).reshape(bsz, n)
        gx_new = fx - x_new
        dg = gx_new - gx
        vT = _inv_jac_rmatvec(Us[:, :step], VTs[:, :step], dx)
        Hdg = _inv_jac_matvec(Us[:, :step], VTs[:, :step], dg)
        denom = (vT * dg).sum(dim=1, keepdim=True)
        ok = denom.abs() > 1e-30
        u = torch.where(ok, (dx - Hdg) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
        Us[:, step] = u
        VTs[:, step] = torch.where(ok, vT, 0.0)
        x, gx = x_new, gx_new
    return track.finish(x0)


SOLVERS: dict[str, Callable] = {}


def register_solver(name: str, fn: Callable) -> None:
    SOLVERS[name] = fn


def get_solver(name: str) -> Callable:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; valid names: {sorted(SOLVERS)}") from None


register_solver("fixed_point", fixed_point)
register_solver("anderson", anderson)
register_solver("broyden", broyden)


def solve(f, x0: Tensor, config: SolverConfig, callback: Optional[StepCallback] = None):
    """Run the solver that ``config`` names. Returns ``(x_best, SolverStats)``."""
    return get_solver(config.name)(f, x0, config.max_iter, config.tol, config.stop_mode,
                                   callback=callback, damping=config.damping,
                                   memory=config.memory)
