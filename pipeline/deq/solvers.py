"""Batched root solvers for h* = F(h*), run under ``torch.no_grad()``.

Every solver has one signature::

    solver(f, x0, max_iter, tol, stop_mode="rel", callback=None, **options) -> (x_best, SolverStats)

``f`` maps a tensor of any shape ``(B, ...)`` to one of the same shape. The
residual is taken over the whole batch, as in MDEQ:
``abs = ||F(x) - x||`` and ``rel = abs / ||F(x)||`` (L2 norms). ``stop_mode="inf"`` stops
on the largest absolute change instead, ``max |F(x) - x|``, as IGNN's fixed-point
iteration does (SwiftieH/IGNN ``inn_pred``: ``torch.norm(X_new - X, np.inf) < tol``);
the L2 traces are kept beside it.

>>> import torch
>>> W = 0.5 * torch.eye(3)
>>> h, stats = broyden(lambda h: h @ W + 1.0, torch.zeros(2, 3), max_iter=20, tol=1e-8)
>>> bool(stats.converged), round(float(h[0, 0]), 4)
(True, 2.0)

A solve that meets NaN or Inf stops there, sets ``stats.diverged`` and returns
the best finite iterate; a solve that runs out of iterations returns its best
iterate (lowest residual, not the last) with ``stats.converged = False``.

Host syncs: the residuals, the best iterate and the stop test stay on the solve's
device; the host reads them to test convergence every ``check_every`` steps, and once at
the end to fill :class:`SolverStats`. On a GPU each read waits for the queued work, so
a solve checked every step makes one sync a step, and a fixed-budget solve
(``check_every=0``: ``max_iter`` steps, then the best iterate) makes one in all. On the
CPU, where a host read costs nothing and a dozen tiny tensor ops a step can cost more than
a small F, the same bookkeeping runs in Python floats (:data:`HOST_BOOKKEEPING_ON_CPU`),
with the same float64 arithmetic: both give the same iterates and traces, bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.utils import parametrize

from .config import LINEAR_SOLVERS, SolverConfig

Tensor = torch.Tensor
StepCallback = Callable[[int, Tensor], None]

# The solvers' bookkeeping on a CPU solve: in Python floats (True), or on the device as on a
# GPU (False; tests/test_host_syncs.py counts that path's host reads on the CPU).
HOST_BOOKKEEPING_ON_CPU = True


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
        sample_rel_residual: per-sample relative residual of the returned iterate, for
            solvers that stop per sample (``gmres``); empty otherwise.
        inf_trace / inf_residual: ``max |F(x) - x|`` of every iterate and of the returned
            one, with ``stop_mode="inf"`` only (empty / NaN otherwise).
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
    sample_rel_residual: list[float] = field(default_factory=list)
    inf_trace: list[float] = field(default_factory=list)
    inf_residual: float = math.nan


def residuals(x: Tensor, fx: Tensor, with_inf: bool) -> tuple[float, float, float]:
    """(||F(x) - x||, that over ||F(x)||, max |F(x) - x| or NaN). A non-finite ||F(x)||
    makes the relative residual inf, never 0: in float32 the norm overflows (past ~1.8e19)
    before ||F(x) - x|| does, and finite / inf would read as converged."""
    diff = fx - x
    abs_res = torch.linalg.vector_norm(diff).item()
    fx_norm = torch.linalg.vector_norm(fx).item()
    rel_res = abs_res / (fx_norm + 1e-12) if math.isfinite(fx_norm) else math.inf
    inf_res = diff.abs().max().item() if with_inf else math.nan
    return abs_res, rel_res, inf_res


class _Tracker:
    """Residual bookkeeping shared by all solvers: traces, best iterate, stopping.

    Everything per step stays on the device: the residuals (float64, as the host would
    compute them from the float32 norms), whether every step so far was finite, the best
    iterate (lowest residual in the stop norm) and whether the tolerance was met. The
    host reads the stop test every ``check_every`` steps (one sync) and the traces once,
    in :meth:`finish` (one sync). On the CPU (:data:`HOST_BOOKKEEPING_ON_CPU`) the same
    rules run in Python floats, read every step, since there a read costs nothing.
    """

    def __init__(self, x0: Tensor, tol: float, stop_mode: str,
                 callback: Optional[StepCallback], check_every: int = 1):
        self.tol, self.stop_mode, self.callback = tol, stop_mode, callback
        self.check_every = check_every
        self.on_host = HOST_BOOKKEEPING_ON_CPU and x0.device.type == "cpu"
        self.x0 = x0
        self.rows: list = []
        self.best: Tensor = x0
        if self.on_host:
            self.best_value, self.best_step = math.inf, 0
            self.alive, self.converged = True, False
            return
        self.best_value = torch.full((), math.inf, dtype=torch.float64, device=x0.device)
        self.best_step = torch.zeros((), dtype=torch.float64, device=x0.device)
        self.alive = torch.ones((), dtype=torch.bool, device=x0.device)
        self.converged = torch.zeros((), dtype=torch.bool, device=x0.device)

    def record(self, step: int, x: Tensor, fx: Tensor) -> bool:
        """Record iterate ``x`` with value ``fx = F(x)``; return True to stop (only on a
        checking step: the host does not see the others)."""
        if self.on_host:
            self._record_on_host(step, x, fx)
        else:
            self._record_on_device(step, x, fx)
        if self.callback is not None:
            self.callback(step, x)
        if self.check_every and step % self.check_every == 0:
            if self.on_host:
                return not self.alive or self.converged
            return bool(~self.alive | self.converged)   # the one host read of this step
        return False

    def _record_on_device(self, step: int, x: Tensor, fx: Tensor) -> None:
        diff = fx - x
        abs_res = torch.linalg.vector_norm(diff).double()
        fx_norm = torch.linalg.vector_norm(fx).double()
        # A non-finite ||F(x)|| makes the relative residual inf, never 0: in float32 the
        # norm overflows (past ~1.8e19) before ||F(x) - x|| does (see residuals()).
        rel_res = torch.where(torch.isfinite(fx_norm), abs_res / (fx_norm + 1e-12),
                              math.inf)
        inf_res = (diff.abs().max().double() if self.stop_mode == "inf"
                   else torch.full_like(abs_res, math.nan))
        value = {"rel": rel_res, "abs": abs_res, "inf": inf_res}[self.stop_mode]
        ok = self.alive & torch.isfinite(abs_res) & torch.isfinite(rel_res)
        better = ok & (value < self.best_value)
        self.best = torch.where(better, x, self.best)
        self.best_value = torch.where(better, value, self.best_value)
        self.best_step = torch.where(better, float(step), self.best_step)
        self.converged = self.converged | (ok & (value <= self.tol))
        self.alive = ok
        self.rows.append(torch.stack([abs_res, rel_res, inf_res]))

    def _record_on_host(self, step: int, x: Tensor, fx: Tensor) -> None:
        """The device rules above in Python floats (float64, as there)."""
        abs_res, rel_res, inf_res = residuals(x, fx, self.stop_mode == "inf")
        value = {"rel": rel_res, "abs": abs_res, "inf": inf_res}[self.stop_mode]
        ok = self.alive and math.isfinite(abs_res) and math.isfinite(rel_res)
        if ok and value < self.best_value:
            self.best, self.best_value, self.best_step = x.clone(), value, step
        self.converged = self.converged or (ok and value <= self.tol)
        self.alive = ok
        self.rows.append([abs_res, rel_res, inf_res])

    def finish(self, x0: Tensor) -> tuple[Tensor, SolverStats]:
        s = SolverStats()
        if not self.rows:
            return x0.clone(), s
        if self.on_host:
            rows, best_step, converged = self.rows, self.best_step, self.converged
        else:  # one host read: every step's residuals, the best step, the tolerance flag
            host = torch.cat([torch.stack(self.rows).flatten(), self.best_step[None],
                              self.converged.double()[None]]).tolist()
            rows = [host[i:i + 3] for i in range(0, len(host) - 2, 3)]
            best_step, converged = int(host[-2]), bool(host[-1])
        first_bad = next((i for i, (a, r, _) in enumerate(rows)
                          if not (math.isfinite(a) and math.isfinite(r))), None)
        if first_bad is not None:
            rows = rows[:first_bad]
        s.abs_trace = [r[0] for r in rows]
        s.rel_trace = [r[1] for r in rows]
        if self.stop_mode == "inf":
            s.inf_trace = [r[2] for r in rows]
        s.nstep = max(0, len(rows) - 1)
        s.converged = converged
        if first_bad is not None and not converged:
            s.diverged, s.reason = True, f"non-finite residual at step {first_bad}"
        if rows:
            s.best_step = best_step
            s.abs_residual, s.rel_residual, s.inf_residual = rows[best_step]
            if self.stop_mode != "inf":
                s.inf_residual = math.nan
        if not s.converged and not s.diverged:
            best = {"abs": s.abs_residual, "rel": s.rel_residual,
                    "inf": s.inf_residual}[self.stop_mode]
            s.reason = (f"tolerance {self.tol:g} ({self.stop_mode}) not met in "
                        f"{s.nstep} steps; best {best:.3e}")
        best = self.best.clone() if self.best is x0 else self.best
        return best, s


@torch.no_grad()
def fixed_point(f, x0, max_iter, tol, stop_mode="rel", callback=None, damping=1.0,
                check_every=1, **_):
    """(Damped) fixed-point iteration h <- (1 - beta) h + beta F(h)."""
    track = _Tracker(x0, tol, stop_mode, callback, check_every)
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
             reg=1e-4, check_every=1, **_):
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
    track = _Tracker(x0, tol, stop_mode, callback, check_every)
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
        # solve_ex without its error check: torch.linalg.solve syncs to check for a
        # singular A, which the regulariser rules out
        alpha = torch.linalg.solve_ex(A, rhs, check_errors=False)[0][:, 1:, 0]  # (B, used)
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
def broyden(f, x0, max_iter, tol, stop_mode="rel", callback=None, check_every=1, **_):
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
    track = _Tracker(x0, tol, stop_mode, callback, check_every)
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


@torch.no_grad()
def gmres(f, x0, max_iter, tol, stop_mode="rel", callback=None, restart=200, **_):
    """Restarted GMRES (Saad & Schultz, 1986) for x = f(x) with an *affine* f, per sample.

    With f(x) = M x + c this solves (I - M) x = c, the backward system of implicit
    differentiation g = (dF/dh)^T g + dL/dh (paper Eq. 4) when f is that map. Each
    sample (dim 0) has its own Krylov basis, Arnoldi process (classical Gram-Schmidt,
    applied twice) and stopping test, so one batched call of f serves every sample.
    A sample stops when ||c_i - (I - M) x_i|| <= tol * ||c_i|| (``rel``) or <= tol
    (``abs``); the residuals in the stats are recomputed from f at the returned x,
    not taken from the Arnoldi estimate. ``max_iter`` counts Arnoldi steps (calls of f)
    over all restarts. Meant for references, in float64: f must be affine, which is not
    checked. A ``callback`` gets ``(0, x0)`` and then every step's iterate (the least-squares
    solution over the Krylov basis so far), which costs a small triangular solve a step.
    """
    if stop_mode not in ("rel", "abs"):
        raise ValueError(f"gmres: stop_mode={stop_mode!r}; expected 'rel' or 'abs'")
    bsz, shape = x0.shape[0], x0.shape
    n = x0[0].numel()
    m = max(1, min(restart, max_iter, n))
    c = f(torch.zeros_like(x0)).reshape(bsz, n)

    def matvec(v: Tensor) -> Tensor:  # (I - M) v
        return v - (f(v.reshape(shape)).reshape(bsz, n) - c)

    c_norm = torch.linalg.vector_norm(c, dim=1)
    thresh = (tol * c_norm if stop_mode == "rel" else torch.full_like(c_norm, tol)).cpu().numpy()
    x = x0.reshape(bsz, n).clone()
    stats = SolverStats()
    r = c - matvec(x)
    total = 0
    if callback is not None:
        callback(0, x.reshape(shape))
    while True:
        beta = torch.linalg.vector_norm(r, dim=1)
        beta_np = beta.cpu().numpy()
        _record_linear(stats, beta_np, c_norm)
        active = beta_np > thresh
        if not np.isfinite(beta_np).all():
            stats.diverged, stats.reason = True, f"non-finite residual after {total} steps"
            break
        if not active.any() or total >= max_iter:
            break
        V = x0.new_empty(bsz, m + 1, n)
        V[:, 0] = r / beta.clamp_min(1e-300)[:, None]
        R = np.zeros((bsz, m + 1, m))            # the Hessenberg matrix, rotated to triangular
        cs, sn = np.ones((bsz, m)), np.zeros((bsz, m))
        g = np.zeros((bsz, m + 1))
        g[:, 0] = beta_np
        j = 0
        while j < m and total < max_iter and active.any():
            w = matvec(V[:, j])
            basis = V[:, :j + 1]
            # (B, 1, n) row vectors against the basis: several times faster on CPU BLAS
            # than batched matrix-vector products
            h = torch.bmm(w[:, None, :], basis.transpose(1, 2))           # (B, 1, j+1)
            w = w - torch.bmm(h, basis).squeeze(1)
            h2 = torch.bmm(w[:, None, :], basis.transpose(1, 2))
            w = w - torch.bmm(h2, basis).squeeze(1)
            h_norm = torch.linalg.vector_norm(w, dim=1)
            col = np.zeros((bsz, m + 1))
            col[:, :j + 1] = (h + h2).squeeze(1).cpu().numpy()
            col[:, j + 1] = h_norm.cpu().numpy()
            keep = torch.as_tensor(active & (col[:, j + 1] > 1e-300), device=x0.device)
            V[:, j + 1] = torch.where(keep[:, None], w / h_norm.clamp_min(1e-300)[:, None], 0.0)
            for i in range(j):                   # earlier Givens rotations
                a, b = col[:, i].copy(), col[:, i + 1]
                col[:, i] = cs[:, i] * a + sn[:, i] * b
                col[:, i + 1] = -sn[:, i] * a + cs[:, i] * b
            rho = np.hypot(col[:, j], col[:, j + 1])
            safe = rho > 0
            cs[:, j] = np.where(safe, col[:, j] / np.where(safe, rho, 1.0), 1.0)
            sn[:, j] = np.where(safe, col[:, j + 1] / np.where(safe, rho, 1.0), 0.0)
            col[:, j], col[:, j + 1] = np.where(safe, rho, col[:, j]), 0.0
            # a sample that stopped keeps an identity column and no more right-hand side
            col[~active] = 0.0
            col[~active, j] = 1.0
            g[~active, j] = 0.0
            g[active, j + 1] = -sn[active, j] * g[active, j]
            g[active, j] = cs[active, j] * g[active, j]
            R[:, :, j] = col
            total += 1
            j += 1
            active = active & (np.abs(g[:, j]) > thresh) & (col[:, j - 1] != 0)
            if callback is not None:
                callback(total, _krylov_iterate(x, V, R, g, j).reshape(shape))
        x = _krylov_iterate(x, V, R, g, j)
        r = c - matvec(x)
    stats.nstep = total
    stats.converged = not stats.diverged and not active.any()
    if not stats.converged and not stats.diverged:
        stats.reason = (f"tolerance {tol:g} ({stop_mode}) not met by every sample in {total} "
                        f"steps; worst relative residual {max(stats.sample_rel_residual):.3e}")
    return x.reshape(shape), stats


def _krylov_iterate(x: Tensor, V: Tensor, R: np.ndarray, g: np.ndarray, j: int) -> Tensor:
    """x + V_j y with y the least-squares solution R_j y = g_j of GMRES after j steps."""
    y = np.stack([_upper_solve(R[b, :j, :j], g[b, :j]) for b in range(x.shape[0])])
    return x + torch.bmm(torch.as_tensor(y, dtype=x.dtype, device=x.device)[:, None, :],
                         V[:, :j]).squeeze(1)


def _record_linear(stats: SolverStats, r_norm: np.ndarray, c_norm: Tensor) -> None:
    """GMRES bookkeeping: whole-batch and per-sample residuals of the current iterate."""
    c = c_norm.cpu().numpy()
    abs_res = float(np.sqrt((r_norm ** 2).sum()))
    stats.abs_trace.append(abs_res)
    stats.rel_trace.append(abs_res / (float(np.sqrt((c ** 2).sum())) + 1e-300))
    stats.abs_residual, stats.rel_residual = stats.abs_trace[-1], stats.rel_trace[-1]
    stats.best_step = len(stats.abs_trace) - 1
    stats.sample_rel_residual = (r_norm / np.maximum(c, 1e-300)).tolist()


def _upper_solve(R, g):
    """Back substitution for the small upper-triangular GMRES system."""
    import scipy.linalg
    return scipy.linalg.solve_triangular(R, g, lower=False) if len(g) else g


# The solvers by name: config.SOLVER_NAMES lists the same names, without torch.
SOLVERS: dict[str, Callable] = {"fixed_point": fixed_point, "anderson": anderson,
                                "broyden": broyden, "gmres": gmres}


def get_solver(name: str) -> Callable:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; valid names: {sorted(SOLVERS)}") from None


_GRAPH_NOTES: set[str] = set()


def cuda_graphed(f: Callable[[Tensor], Tensor], x0: Tensor) -> Callable[[Tensor], Tensor]:
    """F for inputs shaped like ``x0``, captured once as a CUDA graph and replayed on every
    call: its kernels launch as one graph, not one launch each (a forward solve on a GPU
    waits on kernel launches more than on arithmetic).

    F must be one fixed map for the solve: its input injection and dropout masks are
    tensors made before the solve, so the graph reads them as they are. One eager call of
    F (outside the capture: lazy initialisations, allocator warm-up) precedes the capture,
    and every replay returns a copy of the graph's output buffer. Returns ``f`` itself on
    the CPU, and where the capture fails (the reason printed once per kind of failure).
    """
    if not x0.is_cuda:
        return f
    try:
        static_in = x0.clone()
        side = torch.cuda.Stream(x0.device)
        side.wait_stream(torch.cuda.current_stream(x0.device))
        with torch.cuda.stream(side):
            f(static_in)
        torch.cuda.current_stream(x0.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = f(static_in)
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager F
        note = f"{type(err).__name__}: {err}".splitlines()[0]
        if note not in _GRAPH_NOTES:
            _GRAPH_NOTES.add(note)
            print(f"CUDA graph of F not captured, F runs eagerly: {note}", flush=True)
        return f

    def replay(x: Tensor) -> Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    return replay


def solve(f, x0: Tensor, config: SolverConfig, callback: Optional[StepCallback] = None):
    """Run the solver that ``config`` names. Returns ``(x_best, SolverStats)``.

    The solve runs without autograd, with PyTorch's parametrizations (weight norm) cached:
    each is computed once for the whole solve, as the official MDEQ and DEQ code compute
    their weight norm once per forward, not on every call of F. (Calls of F outside the
    solve, under autograd, compute them afresh, so gradients reach their parameters.)
    """
    with torch.no_grad(), parametrize.cached():
        if config.graph and config.name not in LINEAR_SOLVERS:
            f = cuda_graphed(f, x0)
        return get_solver(config.name)(f, x0, config.max_iter, config.tol, config.stop_mode,
                                       callback=callback, damping=config.damping,
                                       memory=config.memory, restart=config.restart,
                                       check_every=config.check_every)
