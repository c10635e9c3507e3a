"""Synthetic study for one L_h (appendix §4.1 and §4.4).

1. Gradient fidelity: for every (k, lambda) of the grid, the UPG and NPG
   estimates of dL/du against the exact gradient, per (u, y) pair: cosine
   similarity, L1 and L2 norms. With ``grid.batch_lams`` all lambda of one k share
   one unroll, stacked along the batch axis (equal to one unroll per lambda).
2. Backward-solver dynamics (appendix Fig. 1), for each W seed of
   ``dynamics.seeds``: Broyden on the backward linear system
   (I - dF/dh)^T g = dL/dh, step by step, beside the phantom gradient's Neumann
   iterate with k = step (Alg. 3), both compared with the exact solution, per pair.

"Exact" is the dense solve (float64) of that system at the h* the forward iterations
reached: 100 fixed-point iterations (appendix §4.1) reach a relative residual of
1e-5 at L_h = 0.9 but stop short of the fixed point from L_h = 0.99 on (the error
contracts like rho^100), so each pair's forward residual is recorded beside it.

Backward layout (``dynamics.layout``): ``per_pair`` runs Broyden per (u, y) pair on its
N x D vector, each pair with its own low-rank inverse-Jacobian estimate, as MDEQ's
batched solver does per sample; ``joint`` runs one Broyden on all pairs' unknowns at once.

Long runs: the grid is computed in chunks of ``chunk`` pairs, and each finished chunk
(and each finished W seed of the dynamics) is written under
``<checkpoints>/synthetic/Lh=<L_h>/<params hash>/``. A killed job rerun with the same
params resumes at its last finished chunk, in the same MLflow run, with the same final
results; a concluded job removes its checkpoints. The estimated total time (pairs x
measured seconds per pair) is printed before the grid starts, from one pair timed alone
after a warm-up, and again from the first chunk; the progress line carries an ETA from
the measured chunk time.

    python -m pipeline synthetic --Lh 0.9 --params '<synthetic slice as JSON>' \\
        --out results/synthetic/Lh=0.9 --checkpoints checkpoints

Each pair (u, y) has u, y in R^{N x D}; the loss of a pair is the MSE of h* against y.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as Fn

from pipeline.deq import (PHANTOMS, EstimatorConfig, SolverConfig, attach_estimator,
                          attach_phantom, dense_jacobian, dense_solve, solve)
from pipeline.models.synthetic import (WEIGHTS, equilibrium_func, jacobian_spectral_radius,
                                       symmetric_weight)
from pipeline.progress import format_seconds, progress

Tensor = torch.Tensor

LAYOUTS = ("per_pair", "joint")
DTYPES = ("float32", "float64")
# The backward dynamics: Broyden on the backward system, GMRES on the same system in the
# same dtype and budget (the contrast that tells Broyden's own instability from the
# system's conditioning), and the phantom gradient's iterate.
METHODS = ("broyden", "gmres", "phantom")
# Behaviours of the backward dynamics, with the thresholds issue 14 names (appendix §4.4:
# "the gradient solver diverges in ill-conditioned situations"; "the norm of the solved
# gradient also tends to explode"), objectives relative to the start ||dL/dh|| (g = 0).
CONVERGED_BELOW = 1e-6   # final objective below this: solved to float32 precision
STALLED_ABOVE = 1e-3     # minimum objective above this: never got close
L1_BLOWUP_ABOVE = 3.0    # ||g||_1 above this many times the exact one


@dataclass(frozen=True)
class SyntheticConfig:
    """The ``synthetic`` slice of params.yaml for one L_h; the defaults are params.yaml's
    (see its comments for the reasons)."""

    Lh: float
    rows: int = 32
    dim: int = 128
    pairs: int = 16
    chunk: int = 16
    u_scale: float = 0.01
    weight: str = "spread"
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    forward: SolverConfig = SolverConfig("fixed_point", 100, 0.0)
    forward_target: float = 1e-5
    ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20)
    lams: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    batch_lams: bool = False
    dynamics_pairs: int = 4
    dynamics_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    dynamics_layout: str = "per_pair"
    dynamics_solver: SolverConfig = SolverConfig("broyden", 100, 0.0)
    phantom_lam: float = 0.5
    cosine_flat: float = 1e-3

    def __post_init__(self) -> None:
        def bad(key, value, want):
            raise ValueError(f"synthetic: {key}={value!r} {want}")

        if not 0.0 < self.Lh < 1.0:
            bad("Lh", self.Lh, "must be in (0, 1)")
        for key in ("rows", "dim", "pairs", "chunk", "dynamics_pairs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(key, value, "must be an integer >= 1")
        if not self.u_scale > 0:
            bad("u_scale", self.u_scale, "must be > 0")
        if self.weight not in WEIGHTS:
            bad("weight", self.weight, f"is not one of {list(WEIGHTS)}")
        if self.dtype not in DTYPES:
            bad("dtype", self.dtype, f"is not one of {list(DTYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", self.device, "must be 'cpu', 'cuda' or 'cuda:<index>'")
        if self.dynamics_layout not in LAYOUTS:
            bad("dynamics.layout", self.dynamics_layout, f"is not one of {list(LAYOUTS)}")
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            bad("grid.k", self.ks, "must be integers >= 1")
        if not self.lams or any(not 0.0 < lam <= 1.0 for lam in self.lams):
            bad("grid.lam", self.lams, "must lie in (0, 1]")
        if not self.dynamics_seeds:
            bad("dynamics.seeds", self.dynamics_seeds, "must name at least one seed")
        if not 0.0 < self.phantom_lam <= 1.0:
            bad("dynamics.phantom_lam", self.phantom_lam, "must lie in (0, 1]")
        if not self.cosine_flat >= 0:
            bad("dynamics.cosine_flat", self.cosine_flat, "must be >= 0")

    @classmethod
    def from_params(cls, Lh: float, p: dict) -> "SyntheticConfig":
        if p.get("activation", "tanh") != "tanh" or p.get("bias", False):
            raise ValueError("synthetic: only activation=tanh without bias is implemented")
        d = p["dynamics"]
        return cls(Lh=Lh, rows=p["rows"], dim=p["dim"], pairs=p["pairs"], chunk=p["chunk"],
                   u_scale=p["u_scale"], weight=p["weight"], seed=p["seed"], dtype=p["dtype"],
                   device=p["device"],
                   # Appendix §4.1: a fixed 100 iterations; the tolerance is the target
                   # they reach, recorded, not a stopping rule (a batch-wide stopping rule
                   # would make each pair's h* depend on the pairs beside it).
                   forward=SolverConfig(p["forward"]["solver"], p["forward"]["max_iter"], 0.0),
                   forward_target=p["forward"]["tol"],
                   ks=tuple(p["grid"]["k"]), lams=tuple(float(x) for x in p["grid"]["lam"]),
                   batch_lams=p["grid"]["batch_lams"],
                   dynamics_pairs=d["pairs"], dynamics_seeds=tuple(d["seeds"]),
                   dynamics_layout=d["layout"],
                   dynamics_solver=SolverConfig(d["solver"], d["max_iter"], 0.0),
                   phantom_lam=d["phantom_lam"], cosine_flat=d["cosine_flat"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# --- the problem -----------------------------------------------------------------------------

def make_pairs(cfg: SyntheticConfig, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Pairs [start, stop): u ~ N(0, u_scale^2), y ~ N(0, 1), each pair from its own seed
    (drawn on the CPU, then moved to ``cfg.device``), so results do not depend on how
    pairs are chunked, nor on the device's generator."""
    us, ys = [], []
    for i in range(start, stop):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + i)
        shape = (cfg.rows, cfg.dim)
        us.append(cfg.u_scale * torch.randn(shape, generator=g, dtype=cfg.torch_dtype))
        ys.append(torch.randn(shape, generator=g, dtype=cfg.torch_dtype))
    return torch.stack(us).to(cfg.device), torch.stack(ys).to(cfg.device)


def weight(cfg: SyntheticConfig, seed: int | None = None) -> Tensor:
    """W of the ``cfg.weight`` kind from ``seed`` (default: ``cfg.seed``, the grid's W)."""
    seed = cfg.seed if seed is None else seed
    return symmetric_weight(cfg.dim, cfg.Lh, torch.Generator().manual_seed(seed),
                            cfg.torch_dtype, cfg.weight).to(cfg.device)


def _loss(h: Tensor, y: Tensor, rows: int, dim: int) -> Tensor:
    """Sum over pairs of each pair's MSE, so one backward gives every pair's gradient."""
    return ((h - y) ** 2).sum() / (rows * dim)


def _loss_grad(h: Tensor, y: Tensor, rows: int, dim: int) -> Tensor:
    """dL/dh of :func:`_loss`."""
    return (2 * (h - y) / (rows * dim)).detach()


def _forward(cfg: SyntheticConfig, W: Tensor, u_rows: Tensor) -> tuple[Tensor, Tensor, int]:
    """h* by the fixed forward budget; each pair's relative residual ||h - F(h)|| / ||h||
    (appendix §4.1's measure) and the number of steps."""
    func = equilibrium_func(W, u_rows)
    with torch.no_grad():
        h_star, stats = solve(func, torch.zeros_like(u_rows), cfg.forward)
        if stats.diverged:
            raise FloatingPointError(f"forward solve diverged at L_h={cfg.Lh}: {stats.reason}")
        pairs = u_rows.shape[0] // cfg.rows
        residual = (func(h_star) - h_star).reshape(pairs, -1).norm(dim=1)
        rel = residual / h_star.reshape(pairs, -1).norm(dim=1).clamp_min(1e-30)
    return h_star, rel, stats.nstep


def _exact(W: Tensor, u_rows: Tensor, h_star: Tensor, grad_h: Tensor):
    """The exact gradient at the reached h*: g = (I - J^T)^{-1} dL/dh by a dense float64
    solve (paper Eq. 4), J = dF/dh per row. Returns (J, g, the graph's F(h) and its h, u)."""
    h = h_star.detach().requires_grad_()
    u = u_rows.detach().requires_grad_()
    Fh = equilibrium_func(W, u)(h)
    J = dense_jacobian(Fh, h)
    return J, dense_solve(J, grad_h, torch.float64), Fh, h, u


# --- 1. gradient fidelity over the (k, lambda) grid --------------------------------------------

def phantom_grads(cfg: SyntheticConfig, W: Tensor, u_rows: Tensor, y_rows: Tensor,
                  h_star: Tensor, name: str, k: int, batch_lams: bool) -> Tensor:
    """dL/du of the phantom gradient ``name`` A_{k,lam} for every lam of the grid:
    shape (len(lams), pairs, N * D).

    ``batch_lams``: the L copies of the chunk go through one unroll, stacked along the
    batch axis with one lam per row (``attach_phantom``); rows do not interact, so each
    copy's gradient is its lam's alone. Otherwise one unroll per lam.
    """
    n_rows = u_rows.shape[0]
    pairs = n_rows // cfg.rows
    if batch_lams:
        L = len(cfg.lams)
        lam = torch.tensor(cfg.lams, dtype=u_rows.dtype, device=u_rows.device)
        lam = lam.repeat_interleave(n_rows).unsqueeze(1)          # rows of copy i: lam_i
        u = u_rows.detach().repeat(L, 1).requires_grad_()
        out = attach_phantom(equilibrium_func(W, u), h_star.repeat(L, 1), name, k, lam)
        _loss(out, y_rows.repeat(L, 1), cfg.rows, cfg.dim).backward()
        return u.grad.reshape(L, pairs, -1)
    grads = []
    for lam in cfg.lams:
        u = u_rows.detach().clone().requires_grad_()
        out = attach_estimator(equilibrium_func(W, u), h_star, EstimatorConfig(name, k=k, lam=lam))
        _loss(out, y_rows, cfg.rows, cfg.dim).backward()
        grads.append(u.grad.reshape(pairs, -1))
    return torch.stack(grads)


def grid_chunk(cfg: SyntheticConfig, W: Tensor, start: int, stop: int) -> dict:
    """The grid on pairs [start, stop): per pair and (estimator, k, lam) the cosine with
    the exact dL/du, and the L1 and L2 norms (``stats``: PHANTOMS x ks x lams x 3 x pairs),
    the exact gradient's norms and the forward residual. CPU float64 tensors and plain
    values only, so a chunk saves with ``torch.save`` and loads with ``weights_only``."""
    t0 = time.perf_counter()
    u, y = make_pairs(cfg, start, stop)
    c = u.shape[0]
    u_rows, y_rows = u.reshape(-1, cfg.dim), y.reshape(-1, cfg.dim)
    h_star, fwd_rel, nstep = _forward(cfg, W, u_rows)
    grad_h = _loss_grad(h_star, y_rows, cfg.rows, cfg.dim)
    _, g, Fh, _, u_leaf = _exact(W, u_rows, h_star, grad_h)
    exact = torch.autograd.grad(Fh, u_leaf, g)[0].reshape(c, -1)   # dL/du = g^T dF/du
    stats = torch.empty(len(PHANTOMS), len(cfg.ks), len(cfg.lams), 3, c, dtype=torch.float64)
    for ik, k in enumerate(cfg.ks):
        for ie, name in enumerate(PHANTOMS):
            est = phantom_grads(cfg, W, u_rows, y_rows, h_star, name, k, cfg.batch_lams)
            cos = Fn.cosine_similarity(est, exact.expand_as(est), dim=2)
            stats[ie, ik, :, 0] = cos.double().cpu()
            stats[ie, ik, :, 1] = est.abs().sum(2).double().cpu()
            stats[ie, ik, :, 2] = est.norm(dim=2).double().cpu()
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"start": start, "stop": stop, "stats": stats,
            "exact_l1": exact.abs().sum(1).double().cpu(),
            "exact_l2": exact.norm(dim=1).double().cpu(),
            "forward_rel_residual": fwd_rel.double().cpu(), "forward_nstep": nstep,
            "seconds": time.perf_counter() - t0}


def chunks(cfg: SyntheticConfig) -> list[tuple[int, int]]:
    return [(s, min(s + cfg.chunk, cfg.pairs)) for s in range(0, cfg.pairs, cfg.chunk)]


def fidelity(cfg: SyntheticConfig, show_progress: bool = True, checkpoint_dir: Path | None = None,
             log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """UPG / NPG vs exact dL/du over the (k, lambda) grid, chunk by chunk.

    Returns the grid (one row per estimator, k, lambda: cosine mean/std/min over
    pairs, mean L1 and L2 norms) and a summary of the forward solves and the exact
    gradient's norms. With ``checkpoint_dir``, finished chunks are loaded from it and
    new ones saved to it.
    """
    W = weight(cfg)
    parts = chunks(cfg)
    done = _load_parts(checkpoint_dir, "grid", len(parts))
    for i, part in done.items():
        if (part["start"], part["stop"]) != parts[i]:
            raise RuntimeError(f"{checkpoint_dir}: chunk {i} holds pairs [{part['start']}, "
                               f"{part['stop']}), expected {list(parts[i])}; delete the folder")
    todo = [i for i in range(len(parts)) if i not in done]
    if done:
        log(f"synthetic L_h={cfg.Lh}: resuming at chunk {len(done) + 1} of {len(parts)} "
            f"({len(done)} finished chunks in {checkpoint_dir})")
    if todo:
        # Before starting: one pair, timed alone after a warm-up pair (both discarded; the
        # first call of a process pays one-off costs, 3-4 x a pair's time on the CPU).
        # Where batching pays (a GPU) it overestimates; the first chunk then refines it.
        first = parts[todo[0]][0]
        grid_chunk(cfg, W, first, first + 1)
        per_pair = grid_chunk(cfg, W, first, first + 1)["seconds"]
        left = sum(b - a for a, b in (parts[j] for j in todo))
        log(f"synthetic L_h={cfg.Lh}: estimated total time of the grid {cfg.pairs} pairs x "
            f"{per_pair:.4f} s/pair = {format_seconds(cfg.pairs * per_pair)} (one pair, timed "
            f"before starting; {left} pairs, {format_seconds(left * per_pair)} to go)")
    every = 10.0 if show_progress else math.inf
    for n, i in enumerate(progress(todo, len(todo), f"synthetic Lh={cfg.Lh} grid", every=every)):
        part = grid_chunk(cfg, W, *parts[i])
        _save_part(checkpoint_dir, "grid", i, part)
        done[i] = part
        if n == 0 and len(todo) > 1:
            per_pair = part["seconds"] / (part["stop"] - part["start"])
            left = sum(b - a for a, b in (parts[j] for j in todo[1:]))
            log(f"synthetic L_h={cfg.Lh}: estimated total time of the grid {cfg.pairs} pairs x "
                f"{per_pair:.4f} s/pair = {format_seconds(cfg.pairs * per_pair)} (measured on "
                f"chunk {i + 1} of {len(parts)}; {left} pairs, "
                f"{format_seconds(left * per_pair)} to go)")
    ordered = [done[i] for i in range(len(parts))]
    stats = torch.cat([p["stats"] for p in ordered], dim=-1)
    rows = []
    for ie, name in enumerate(PHANTOMS):
        for ik, k in enumerate(cfg.ks):
            for il, lam in enumerate(cfg.lams):
                cos, l1, l2 = stats[ie, ik, il]
                rows.append(dict(estimator=name, k=k, lam=lam, cos_mean=cos.mean().item(),
                                 cos_std=cos.std().item() if cos.numel() > 1 else 0.0,
                                 cos_min=cos.min().item(), l1_mean=l1.mean().item(),
                                 l2_mean=l2.mean().item()))
    fwd = torch.cat([p["forward_rel_residual"] for p in ordered])
    eig = torch.linalg.eigvalsh(W.double().cpu())
    seconds = sum(p["seconds"] for p in ordered)
    summary = dict(
        Lh=cfg.Lh, pairs=cfg.pairs, rows=cfg.rows, dim=cfg.dim, dtype=cfg.dtype,
        device=cfg.device, u_scale=cfg.u_scale, weight=cfg.weight, seed=cfg.seed,
        spectral_norm_W=torch.linalg.matrix_norm(W.double(), ord=2).item(),
        W_eigenvalue_max=eig[-1].item(), W_eigenvalue_min=eig[0].item(),
        forward_rel_residual_max=fwd.max().item(),
        forward_rel_residual_median=fwd.median().item(),
        forward_steps_max=max(p["forward_nstep"] for p in ordered),
        forward_target=cfg.forward_target,
        forward_target_met=bool((fwd <= cfg.forward_target).all()),
        exact_l1_mean=torch.cat([p["exact_l1"] for p in ordered]).mean().item(),
        exact_l2_mean=torch.cat([p["exact_l2"] for p in ordered]).mean().item(),
        chunks=len(parts), grid_seconds=seconds, seconds_per_pair=seconds / cfg.pairs,
    )
    frame = pd.DataFrame(rows).sort_values(["estimator", "lam", "k"]).reset_index(drop=True)
    summary["grid_checks"] = grid_checks(frame)
    return frame, summary


GRID_COS_FLAT = 1e-6  # a change of the mean cosine below this is float noise, not a trend


def grid_checks(grid: pd.DataFrame) -> dict:
    """What the main paper's synthetic figure shows, measured on the grid (the mean cosine
    over pairs of each estimator, k and lam), for the report to judge:

    * ``series_not_rising``: of the (estimator, lam) series, how many fall somewhere as k
      grows (by more than GRID_COS_FLAT), out of ``series``;
    * ``upg_npg_max_abs_diff``: the largest |cos_UPG - cos_NPG| over (k, lam);
    * ``larger_lam_lower``: over the estimators, k and each pair of neighbouring lam,
      how often the larger lam has the lower cosine (by more than GRID_COS_FLAT), out of
      ``lam_pairs``.
    """
    series = not_rising = pairs = lower = 0
    for _, part in grid.groupby(["estimator", "lam"]):
        series += 1
        not_rising += int((np.diff(part.sort_values("k").cos_mean) < -GRID_COS_FLAT).any())
    for _, part in grid.groupby(["estimator", "k"]):
        cos = part.sort_values("lam").cos_mean.to_numpy()
        pairs += len(cos) - 1
        lower += int((np.diff(cos) < -GRID_COS_FLAT).sum())
    wide = grid.pivot_table(index=["k", "lam"], columns="estimator", values="cos_mean")
    diff = (wide["upg"] - wide["npg"]).abs().max() if {"upg", "npg"} <= set(wide) else math.nan
    return {"series": series, "series_not_rising": not_rising, "flat": GRID_COS_FLAT,
            "upg_npg_max_abs_diff": float(diff), "lam_pairs": pairs,
            "larger_lam_lower": lower}


# --- 2. backward-solver dynamics (appendix Fig. 1) ------------------------------------------------

def dynamics_seed(cfg: SyntheticConfig, seed: int) -> dict:
    """Appendix §4.4 for the W of one seed: Broyden on (I - J^T) g = dL/dh vs the phantom
    gradient's iterate, per pair and step: (1) the objective ||(I - J^T) g - dL/dh||,
    (2) it over ||g||, (3) cos(g, exact), (4) ||g||_1. GMRES runs on the same system, pairs
    and dtype with Broyden's budget and tolerance (each step's least-squares iterate), so
    that what Broyden does can be told from what the system's conditioning allows.

    The phantom iterate with k terms is lam * sum_{t<k} (B^T)^t dL/dh with
    B = (1 - lam) I + lam J (Alg. 3, Eq. A-10); it is recorded at step k. Also per pair:
    rho(dF/dh) at h* (exact, by an eigen-solve; a pair's is its rows' largest),
    the forward residual, ||dL/dh|| (the objective at g = 0) and the exact ||g||_1.
    """
    t0 = time.perf_counter()
    W = weight(cfg, seed)
    P, D = cfg.dynamics_pairs, cfg.dim
    u, y = make_pairs(cfg, 0, P)
    u_rows = u.reshape(-1, D)
    h_star, fwd_rel, _ = _forward(cfg, W, u_rows)
    grad_h = _loss_grad(h_star, y.reshape(-1, D), cfg.rows, D)
    _, exact_rows, Fh, h, _ = _exact(W, u_rows, h_star, grad_h)
    exact = exact_rows.reshape(P, -1)
    rho = jacobian_spectral_radius(W, u_rows, h_star).reshape(P, cfg.rows).amax(dim=1)

    def vjp(v: Tensor) -> Tensor:  # v^T dF/dh, per row
        return torch.autograd.grad(Fh, h, v, retain_graph=True)[0]

    curves = {m: {q: [] for q in ("objective", "rel_error", "cosine", "l1")} for m in METHODS}

    def record(method: str, g_rows: Tensor) -> None:
        g = g_rows.reshape(P, -1)
        objective = (g_rows - vjp(g_rows) - grad_h).reshape(P, -1).norm(dim=1)
        norm = g.norm(dim=1)
        rel = torch.where(norm > 0, objective / norm.clamp_min(1e-30),
                          torch.full_like(norm, float("nan")))
        for q, v in (("objective", objective), ("rel_error", rel),
                     ("cosine", Fn.cosine_similarity(g, exact, dim=1)), ("l1", g.abs().sum(1))):
            curves[method][q].append(v.detach().double().cpu())

    # per_pair: a batch of P pairs, each its own Broyden; joint: one Broyden on everything
    shape = (P, cfg.rows * D) if cfg.dynamics_layout == "per_pair" else (1, P * cfg.rows * D)
    backward_map = lambda g: (vjp(g.reshape(-1, D)) + grad_h).reshape(shape)  # noqa: E731
    g0 = torch.zeros(shape, dtype=grad_h.dtype, device=grad_h.device)
    _, bstats = solve(backward_map, g0, cfg.dynamics_solver,
                      callback=lambda step, g: record("broyden", g.reshape(-1, D)))
    # GMRES on the same system, pairs and dtype, with Broyden's budget and tolerance
    gmres_cfg = SolverConfig("gmres", cfg.dynamics_solver.max_iter, cfg.dynamics_solver.tol,
                             "rel", restart=max(1, cfg.dynamics_solver.max_iter))
    solve(backward_map, g0, gmres_cfg, callback=lambda step, g: record("gmres", g.reshape(-1, D)))
    lam = cfg.phantom_lam
    g_hat = grad_h
    for _ in range(cfg.dynamics_solver.max_iter):  # Alg. 3, one more Neumann term a step
        record("phantom", lam * g_hat)
        g_hat = grad_h + (1 - lam) * g_hat + lam * vjp(g_hat)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seed": seed,
            "curves": {m: {q: torch.stack(v) for q, v in c.items()} for m, c in curves.items()},
            "rho": rho.cpu(), "forward_rel_residual": fwd_rel.double().cpu(),
            "objective_start": grad_h.reshape(P, -1).norm(dim=1).double().cpu(),
            "exact_l1": exact.abs().sum(1).double().cpu(),
            "broyden_diverged": bool(bstats.diverged), "broyden_reason": bstats.reason,
            "seconds": time.perf_counter() - t0}


def cosine_sign_changes(cosine: np.ndarray, flat: float) -> int:
    """How often the slope of a cosine curve changes sign; steps that change it by at most
    ``flat`` count as flat and are skipped, so float noise at a plateau is not counted."""
    slope = np.diff(cosine[np.isfinite(cosine)])
    signs = np.sign(slope[np.abs(slope) > flat])
    return int((signs[1:] != signs[:-1]).sum())


def pair_table(cfg: SyntheticConfig, parts: list[dict]) -> pd.DataFrame:
    """One row per (seed, pair, method): the per-pair outcomes of the dynamics, objectives
    relative to the start ||dL/dh||."""
    rows = []
    for part in parts:
        start = part["objective_start"].numpy()
        for method in METHODS:
            c = {q: v.numpy() for q, v in part["curves"][method].items()}
            for p in range(cfg.dynamics_pairs):
                obj = c["objective"][:, p] / start[p]
                rows.append(dict(
                    seed=part["seed"], pair=p, method=method, rho=part["rho"][p].item(),
                    forward_rel_residual=part["forward_rel_residual"][p].item(),
                    exact_l1=part["exact_l1"][p].item(),
                    min_objective_rel=float(np.nanmin(obj)),
                    final_objective_rel=float(obj[np.isfinite(obj)][-1]),
                    ended_above_start=bool(obj[np.isfinite(obj)][-1] > 1.0),
                    max_l1_over_exact=float(np.nanmax(c["l1"][:, p]) / part["exact_l1"][p].item()),
                    final_cosine=float(c["cosine"][:, p][np.isfinite(c["cosine"][:, p])][-1]),
                    cos_sign_changes=cosine_sign_changes(c["cosine"][:, p], cfg.cosine_flat),
                    diverged=part["broyden_diverged"] if method == "broyden" else False))
    return pd.DataFrame(rows)


def seed_behaviours(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per method, how many W seeds showed each behaviour: ``converged`` (every pair's final
    objective below CONVERGED_BELOW of its start), ``stalled`` (every pair's minimum above
    STALLED_ABOVE), and, in at least one pair, ``ended_above_start``, ``cosine_not_monotone``
    (a sign change of the cosine's slope) and ``l1_blowup`` (||g||_1 above L1_BLOWUP_ABOVE
    times the exact one)."""
    out = {}
    for method, part in table.groupby("method"):
        by_seed = part.groupby("seed")
        out[method] = dict(
            seeds=int(by_seed.ngroups),
            converged=int(by_seed.final_objective_rel.max().lt(CONVERGED_BELOW).sum()),
            stalled=int(by_seed.min_objective_rel.min().gt(STALLED_ABOVE).sum()),
            ended_above_start=int(by_seed.ended_above_start.any().sum()),
            cosine_not_monotone=int(by_seed.cos_sign_changes.max().gt(0).sum()),
            l1_blowup=int(by_seed.max_l1_over_exact.max().gt(L1_BLOWUP_ABOVE).sum()),
            diverged=int(by_seed.diverged.any().sum()))
    return out


def dynamics(cfg: SyntheticConfig, show_progress: bool = True, checkpoint_dir: Path | None = None,
             log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The dynamics for every W seed: (per-step curves per seed, pair and method; per-pair
    outcomes; summary). Finished seeds are loaded from / saved to ``checkpoint_dir``."""
    seeds = list(cfg.dynamics_seeds)
    done = _load_parts(checkpoint_dir, "dynamics", len(seeds))
    todo = [i for i in range(len(seeds)) if i not in done]
    every = 10.0 if show_progress else math.inf
    for i in progress(todo, len(todo), f"synthetic Lh={cfg.Lh} dynamics", every=every):
        done[i] = dynamics_seed(cfg, seeds[i])
        _save_part(checkpoint_dir, "dynamics", i, done[i])
    parts = [done[i] for i in range(len(seeds))]
    frames = []
    for part in parts:
        for method in METHODS:
            c = part["curves"][method]
            steps = np.arange(c["objective"].shape[0]) + (1 if method == "phantom" else 0)
            for p in range(cfg.dynamics_pairs):
                frames.append(pd.DataFrame(dict(
                    seed=part["seed"], pair=p, method=method, step=steps,
                    **{q: v[:, p].numpy() for q, v in c.items()})))
    curves = pd.concat(frames, ignore_index=True)
    table = pair_table(cfg, parts)
    rho = torch.cat([p["rho"] for p in parts])
    summary = dict(
        seeds=seeds, pairs_per_seed=cfg.dynamics_pairs, layout=cfg.dynamics_layout,
        phantom_lam=cfg.phantom_lam,
        solver=cfg.dynamics_solver.name, max_iter=cfg.dynamics_solver.max_iter,
        rho_dF_dh_min=rho.min().item(), rho_dF_dh_median=rho.median().item(),
        rho_dF_dh_max=rho.max().item(),
        forward_rel_residual_max=max(p["forward_rel_residual"].max().item() for p in parts),
        exact_l1_median=float(table.exact_l1.median()),
        behaviours=seed_behaviours(table),
        broyden_diverged=any(p["broyden_diverged"] for p in parts),
        broyden_reasons=sorted({p["broyden_reason"] for p in parts}),
        seconds=sum(p["seconds"] for p in parts),
    )
    for method, part in table.groupby("method"):
        summary[method] = dict(
            min_objective_rel_median=float(part.min_objective_rel.median()),
            min_objective_rel_lowest=float(part.min_objective_rel.min()),
            final_objective_rel_median=float(part.final_objective_rel.median()),
            final_objective_rel_highest=float(part.final_objective_rel.max()),
            pairs_above_start=int(part.ended_above_start.sum()), pairs=len(part),
            max_l1_over_exact=float(part.max_l1_over_exact.max()),
            final_cosine_median=float(part.final_cosine.median()),
            final_cosine_min=float(part.final_cosine.min()),
            cos_sign_changes_median=float(part.cos_sign_changes.median()),
            cos_sign_changes_min=int(part.cos_sign_changes.min()),
            cos_sign_changes_max=int(part.cos_sign_changes.max()))
    return curves, table, summary


# --- both parts, and their checkpoints -----------------------------------------------------------

def run(cfg: SyntheticConfig, show_progress: bool = True, checkpoint_dir: Path | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Both parts of the study; returns {"grid", "dynamics", "pairs": DataFrame, "summary"}."""
    grid, summary = fidelity(cfg, show_progress, checkpoint_dir, log)
    curves, table, dyn = dynamics(cfg, show_progress, checkpoint_dir, log)
    summary.update({f"dynamics_{k}": v for k, v in dyn.items()})
    return {"grid": grid, "dynamics": curves, "pairs": table, "summary": summary}


def _part_path(checkpoint_dir: Path, kind: str, index: int) -> Path:
    return Path(checkpoint_dir) / f"{kind}_{index:06d}.pt"


def _save_part(checkpoint_dir: Path | None, kind: str, index: int, part: dict) -> None:
    if checkpoint_dir is None:
        return
    from pipeline.io import atomic_path
    with atomic_path(_part_path(checkpoint_dir, kind, index)) as tmp:
        torch.save(part, tmp)


def _load_parts(checkpoint_dir: Path | None, kind: str, count: int) -> dict[int, dict]:
    """The finished parts of ``kind`` found in ``checkpoint_dir`` (an interrupted write
    leaves only a hidden temporary file, which is not read)."""
    if checkpoint_dir is None:
        return {}
    found = {}
    for i in range(count):
        path = _part_path(checkpoint_dir, kind, i)
        if path.exists():
            found[i] = torch.load(path, map_location="cpu", weights_only=True)
    return found


# --- CLI edge: files and tracking -------------------------------------------------------------

OUTPUTS = ("grid.csv", "dynamics.csv", "pairs.csv", "summary.json")


def add_arguments(parser) -> None:
    from pipeline import tracking
    parser.add_argument("--Lh", type=float, required=True)
    parser.add_argument("--params", required=True, help="the synthetic slice of params.yaml, JSON")
    parser.add_argument("--scale", default="default")
    parser.add_argument("--out", required=True, help=f"directory for {', '.join(OUTPUTS)}")
    parser.add_argument("--checkpoints", default="checkpoints",
                        help="root of <checkpoints>/synthetic/Lh=<L_h>/<params hash>/")
    tracking.add_run_arguments(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def checkpoint_folder(root: str | Path, Lh: float, params: dict) -> Path:
    """``<root>/synthetic/Lh=<repr(L_h)>/<hash of L_h and the slice>``: a folder per job
    and params, whatever the rule's wildcard formatting."""
    from pipeline.io import params_hash
    return Path(root) / "synthetic" / f"Lh={Lh!r}" / params_hash({"Lh": Lh, "synthetic": params})


def generator_digest(cfg: SyntheticConfig) -> str:
    """sha256 of the settings that generate the study's data (W and the (u, y) pairs): the
    synthetic study's dataset digest. Two runs with the same digest saw the same numbers."""
    import hashlib
    keys = ("Lh", "rows", "dim", "pairs", "u_scale", "weight", "seed", "dtype",
            "dynamics_pairs", "dynamics_seeds")
    blob = json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def main(args) -> int:
    from pipeline import environment, tracking
    from pipeline.io import params_hash, read_json, write_csv, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    cfg = SyntheticConfig.from_params(args.Lh, params)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"synthetic L_h={args.Lh}: device={cfg.device!r} but no CUDA device is "
                         "visible; run the paper scale on a GPU node (profiles/slurm) or set "
                         "synthetic.device: cpu")
    ckdir = checkpoint_folder(args.checkpoints, args.Lh, params)
    ckdir.mkdir(parents=True, exist_ok=True)
    run_file = ckdir / "run.json"
    run_id = read_json(run_file).get("run_id") if run_file.exists() else None
    env = environment.record(cfg.device)
    tags = {"study": "synthetic", "scale": args.scale, "Lh": args.Lh,
            "params_hash": params_hash(params), **environment.tags(env),
            **json.loads(args.tags)}
    out = Path(args.out)
    print(f"synthetic L_h={cfg.Lh}: {cfg.pairs} pairs in {len(chunks(cfg))} chunks of "
          f"{cfg.chunk}, {len(cfg.ks)} k x {len(cfg.lams)} lambda, {cfg.dtype} on {cfg.device}; "
          f"dynamics over {len(cfg.dynamics_seeds)} W seeds ({cfg.dynamics_layout}); "
          f"checkpoints in {ckdir}", flush=True)
    with tracking.start_run(args.tracking_uri, "synthetic", f"Lh={args.Lh}", tags,
                            {"synthetic": params, "Lh": args.Lh, "scale": args.scale},
                            args.artifacts, run_id=run_id,
                            batch_size=args.tracking_batch_size,
                            system_metrics_s=args.system_metrics) as tracker:
        if tracker.run_id is not None and run_id is None:
            write_json({"run_id": tracker.run_id}, run_file)
        tracker.log_dataset(f"synthetic L_h={cfg.Lh:g}", generator_digest(cfg),
                            "generated: pipeline.experiments.synthetic (make_pairs, weight)",
                            ["grid", "dynamics"])
        result = run_and_log(cfg, tracker, ckdir, log=lambda msg: print(msg, flush=True))
        result["summary"].update(scale=args.scale, dataset="synthetic",
                                 mlflow_run_id=tracker.run_id, git_commit=tracking.git_commit(),
                                 tracking_s=tracking.store_seconds(), environment=env,
                                 dataset_sha256=generator_digest(cfg))
        write_csv(result["grid"], out / "grid.csv")
        write_csv(result["dynamics"], out / "dynamics.csv")
        write_csv(result["pairs"], out / "pairs.csv")
        write_json(result["summary"], out / "summary.json")
        for name in OUTPUTS:
            tracker.log_artifact(out / name)
    # Concluded: the checkpoints served an interrupted job only, and must not turn a later
    # forced rerun (say, after a code change) into a no-op resume.
    shutil.rmtree(ckdir, ignore_errors=True)
    for folder in (ckdir.parent, ckdir.parent.parent):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    s = result["summary"]
    print(f"L_h={cfg.Lh}: forward rel residual {s['forward_rel_residual_max']:.2e} "
          f"({s['forward_steps_max']} steps), rho(dF/dh) at h* {s['dynamics_rho_dF_dh_min']:.5f}"
          f"-{s['dynamics_rho_dF_dh_max']:.5f}; Broyden objective / start: min "
          f"{s['dynamics_broyden']['min_objective_rel_median']:.2e}, final "
          f"{s['dynamics_broyden']['final_objective_rel_median']:.2e} (medians); grid "
          f"{s['grid_seconds']:.1f}s ({s['seconds_per_pair']:.3f} s/pair), dynamics "
          f"{s['dynamics_seconds']:.1f}s")
    return 0


def run_and_log(cfg: SyntheticConfig, tracker, checkpoint_dir: Path | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Run the study and log its curves and summary under pipeline.tracking's names: over
    k for the grid (step = k), over solver steps for the dynamics (medians over pairs)."""
    from pipeline import tracking as M
    result = run(cfg, checkpoint_dir=checkpoint_dir, log=log)
    grid, dyn, s = result["grid"], result["dynamics"], result["summary"]
    for (name, lam), part in grid.groupby(["estimator", "lam"]):
        method = f"{name}_lam{lam:g}"
        tracker.log_curves({M.method_metric(M.GRAD_COS, method): part.cos_mean.tolist(),
                            M.method_metric(M.GRAD_NORM_L1, method): part.l1_mean.tolist(),
                            M.method_metric(M.GRAD_NORM_L2, method): part.l2_mean.tolist()},
                           part.k.tolist())
    names = {"objective": M.BACKWARD_OBJECTIVE, "rel_error": M.BACKWARD_REL_ERROR,
             "cosine": M.GRAD_COS, "l1": M.GRAD_NORM_L1}
    for method, part in dyn.groupby("method"):
        median = part.groupby("step")[list(names)].median()
        tracker.log_curves({M.method_metric(name, method): median[col].tolist()
                            for col, name in names.items()}, median.index.tolist())
    metrics = {M.RHO: s["dynamics_rho_dF_dh_median"], M.RHO_MIN: s["dynamics_rho_dF_dh_min"],
               M.SOLVER_REL_RESIDUAL: s["forward_rel_residual_max"],
               M.SOLVER_NSTEPS: s["forward_steps_max"],
               M.FORWARD_CONVERGED: float(s["forward_target_met"]),
               M.GRAD_REF_NORM_L1: s["exact_l1_mean"],
               M.TIME_PAIR: s["seconds_per_pair"], M.TIME_DYNAMICS: s["dynamics_seconds"]}
    per_method = {M.BACKWARD_MIN_OBJECTIVE: "min_objective_rel_median",
                  M.BACKWARD_FINAL_OBJECTIVE: "final_objective_rel_median",
                  M.BACKWARD_ABOVE_START: "pairs_above_start",
                  M.BACKWARD_L1_OVER_EXACT: "max_l1_over_exact",
                  M.BACKWARD_COS_SIGN_CHANGES: "cos_sign_changes_median"}
    for method in METHODS:
        metrics.update({M.method_metric(name, method): s[f"dynamics_{method}"][key]
                        for name, key in per_method.items()})
    tracker.log_metrics(metrics)
    return result
