"""Synthetic study for one L_h (appendix §4.1 and §4.4).

1. Gradient fidelity: for every (k, lambda) of the grid, the UPG and NPG
   estimates of dL/du against the exact gradient (dense solve), per (u, y)
   pair: cosine similarity, L1 and L2 norms.
2. Backward-solver dynamics (appendix Fig. 1): Broyden on the backward linear
   system (I - dF/dh)^T g = dL/dh, step by step, beside the phantom gradient's
   Neumann iterate with k = step (Alg. 3), both compared with the exact solution.

    python -m pipeline synthetic --Lh 0.9 --params '<synthetic slice as JSON>' \
        --out results/synthetic/Lh=0.9

Each pair (u, y) has u, y in R^{N x D}; the loss of a pair is the MSE of h* against y.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as Fn

from pipeline.deq import (EstimatorConfig, SolverConfig, attach_estimator, dense_backward,
                          jacobian_spectral_radius, solve)
from pipeline.models.synthetic import equilibrium_func, symmetric_weight
from pipeline.progress import progress

Tensor = torch.Tensor


@dataclass(frozen=True)
class SyntheticConfig:
    """The ``synthetic`` slice of params.yaml for one L_h (see params.yaml for the choices)."""

    Lh: float
    rows: int = 32
    dim: int = 128
    pairs: int = 64
    chunk: int = 64
    u_scale: float = 1.0
    seed: int = 0
    dtype: str = "float64"
    forward: SolverConfig = SolverConfig("fixed_point", 100, 0.0)
    forward_target: float = 1e-5
    ks: tuple[int, ...] = (1, 2, 5, 10, 20)
    lams: tuple[float, ...] = (0.1, 0.5, 1.0)
    dynamics_pairs: int = 8
    dynamics_solver: SolverConfig = SolverConfig("broyden", 100, 0.0)
    phantom_lam: float = 0.5

    @classmethod
    def from_params(cls, Lh: float, p: dict) -> "SyntheticConfig":
        if p.get("activation", "tanh") != "tanh" or p.get("bias", False):
            raise ValueError("synthetic: only activation=tanh without bias is implemented")
        return cls(Lh=Lh, rows=p["rows"], dim=p["dim"], pairs=p["pairs"], chunk=p["chunk"],
                   u_scale=p["u_scale"], seed=p["seed"], dtype=p["dtype"],
                   # Appendix §4.1: a fixed 100 iterations; the tolerance is the target
                   # they reach, recorded, not a stopping rule (a batch-wide stopping rule
                   # would make each pair's h* depend on the pairs beside it).
                   forward=SolverConfig(p["forward"]["solver"], p["forward"]["max_iter"], 0.0),
                   forward_target=p["forward"]["tol"],
                   ks=tuple(p["grid"]["k"]), lams=tuple(p["grid"]["lam"]),
                   dynamics_pairs=p["dynamics"]["pairs"],
                   dynamics_solver=SolverConfig(p["dynamics"]["solver"],
                                                p["dynamics"]["max_iter"], 0.0),
                   phantom_lam=p["dynamics"]["phantom_lam"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_pairs(cfg: SyntheticConfig, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Pairs [start, stop): u ~ N(0, u_scale^2), y ~ N(0, 1), each pair from its own seed,
    so results do not depend on how pairs are chunked."""
    us, ys = [], []
    for i in range(start, stop):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + i)
        shape = (cfg.rows, cfg.dim)
        us.append(cfg.u_scale * torch.randn(shape, generator=g, dtype=cfg.torch_dtype))
        ys.append(torch.randn(shape, generator=g, dtype=cfg.torch_dtype))
    return torch.stack(us), torch.stack(ys)


def weight(cfg: SyntheticConfig) -> Tensor:
    return symmetric_weight(cfg.dim, cfg.Lh, torch.Generator().manual_seed(cfg.seed),
                            cfg.torch_dtype)


def _loss(h: Tensor, y: Tensor, rows: int, dim: int) -> Tensor:
    """Sum over pairs of each pair's MSE, so one backward gives every pair's gradient."""
    return ((h - y) ** 2).sum() / (rows * dim)


def fidelity(cfg: SyntheticConfig, show_progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """UPG / NPG vs exact dL/du over the (k, lambda) grid.

    Returns the grid (one row per estimator, k, lambda: cosine mean/std/min over
    pairs, mean L1 and L2 norms) and a summary of the forward solves and the exact
    gradient's norms.
    """
    W = weight(cfg)
    per_point: dict[tuple, list[Tensor]] = {}
    exact_l1, exact_l2, fwd = [], [], []
    chunks = range(0, cfg.pairs, cfg.chunk)
    for start in progress(chunks, len(chunks), f"synthetic Lh={cfg.Lh}",
                          every=10.0 if show_progress else float("inf")):
        u, y = make_pairs(cfg, start, min(start + cfg.chunk, cfg.pairs))
        c = u.shape[0]
        u_rows = u.reshape(-1, cfg.dim).requires_grad_()
        func = equilibrium_func(W, u_rows)
        h_star, stats = solve(func, torch.zeros_like(u_rows), cfg.forward)
        if stats.diverged:
            raise FloatingPointError(f"forward solve diverged at L_h={cfg.Lh}: {stats.reason}")
        fwd.append(stats)
        y_rows = y.reshape(-1, cfg.dim)

        def grad_u(est: EstimatorConfig) -> Tensor:
            u_rows.grad = None
            out = attach_estimator(func, h_star, est)
            _loss(out, y_rows, cfg.rows, cfg.dim).backward()
            return u_rows.grad.reshape(c, -1).clone()

        exact = grad_u(EstimatorConfig("exact"))
        exact_l1.append(exact.abs().sum(1))
        exact_l2.append(exact.norm(dim=1))
        for lam in cfg.lams:
            for k in cfg.ks:
                for name in ("upg", "npg"):
                    est = grad_u(EstimatorConfig(name, k=k, lam=lam))
                    per_point.setdefault((name, k, lam), []).append(torch.stack([
                        Fn.cosine_similarity(est, exact, dim=1), est.abs().sum(1),
                        est.norm(dim=1)]))
    rows = []
    for (name, k, lam), parts in per_point.items():
        cos, l1, l2 = torch.cat(parts, dim=1)
        rows.append(dict(estimator=name, k=k, lam=lam, cos_mean=cos.mean().item(),
                         cos_std=cos.std().item() if cos.numel() > 1 else 0.0,
                         cos_min=cos.min().item(), l1_mean=l1.mean().item(),
                         l2_mean=l2.mean().item()))
    summary = dict(
        Lh=cfg.Lh, pairs=cfg.pairs, rows=cfg.rows, dim=cfg.dim, dtype=cfg.dtype,
        spectral_norm_W=torch.linalg.matrix_norm(W, ord=2).item(),
        forward_rel_residual_max=max(s.rel_residual for s in fwd),
        forward_steps_max=max(s.nstep for s in fwd),
        forward_target=cfg.forward_target,
        forward_target_met=all(s.rel_residual <= cfg.forward_target for s in fwd),
        exact_l1_mean=torch.cat(exact_l1).mean().item(),
        exact_l2_mean=torch.cat(exact_l2).mean().item(),
    )
    return pd.DataFrame(rows).sort_values(["estimator", "lam", "k"]), summary


def dynamics(cfg: SyntheticConfig) -> tuple[pd.DataFrame, dict]:
    """Appendix §4.4: Broyden on (I - J^T) g = dL/dh vs the phantom gradient's iterate.

    Per step, averaged over ``dynamics_pairs`` pairs: (1) the objective
    ||(I - J^T) g - dL/dh||, (2) it over ||g||, (3) cos(g, exact), (4) ||g||_1.
    The phantom iterate with k terms is lam * sum_{t<k} (B^T)^t dL/dh with
    B = (1 - lam) I + lam J (Alg. 3, Eq. A-10); it is shown at step k.
    """
    W = weight(cfg)
    P = cfg.dynamics_pairs
    u, y = make_pairs(cfg, 0, P)
    u_rows = u.reshape(-1, cfg.dim)
    func = equilibrium_func(W, u_rows)
    with torch.no_grad():
        h_star, fstats = solve(func, torch.zeros_like(u_rows), cfg.forward)
    h = h_star.detach().requires_grad_()
    Fh = func(h)
    grad_h = (2 * (h_star - y.reshape(-1, cfg.dim)) / (cfg.rows * cfg.dim)).detach()

    def vjp(v: Tensor) -> Tensor:  # v^T dF/dh, per row
        return torch.autograd.grad(Fh, h, v, retain_graph=True)[0]

    exact = dense_backward(Fh, h, grad_h).detach().reshape(P, -1)
    records = []

    def record(method: str, step: int, g_rows: Tensor) -> None:
        g = g_rows.reshape(P, -1)
        objective = (g_rows - vjp(g_rows) - grad_h).reshape(P, -1).norm(dim=1)
        norm = g.norm(dim=1)
        rel = torch.where(norm > 0, objective / norm.clamp_min(1e-300),
                          torch.full_like(norm, float("nan")))
        records.append(dict(method=method, step=step, objective=objective.mean().item(),
                            rel_error=rel.mean().item(),
                            cosine=Fn.cosine_similarity(g, exact, dim=1).mean().item(),
                            l1=g.abs().sum(1).mean().item()))

    shape = (P, cfg.rows * cfg.dim)
    _, bstats = solve(lambda g: (vjp(g.reshape(-1, cfg.dim)) + grad_h).reshape(shape),
                      torch.zeros(shape, dtype=grad_h.dtype), cfg.dynamics_solver,
                      callback=lambda step, g: record("broyden", step, g.reshape(-1, cfg.dim)))
    lam = cfg.phantom_lam
    g_hat = grad_h
    for k in range(1, cfg.dynamics_solver.max_iter + 1):  # Alg. 3, one more Neumann term a step
        record("phantom", k, lam * g_hat)
        g_hat = grad_h + (1 - lam) * g_hat + lam * vjp(g_hat)
    # Effective conditioning at h*: tanh saturates, so rho(dF/dh) < L_h (per pair: max over rows).
    rho = jacobian_spectral_radius(lambda z: func(z.reshape(-1, cfg.dim)).reshape(P, -1),
                                   h_star.reshape(P, -1), iters=50,
                                   generator=torch.Generator().manual_seed(cfg.seed))
    summary = dict(exact_l1_mean=exact.abs().sum(1).mean().item(),
                   rho_dF_dh_mean=rho.mean().item(), rho_dF_dh_max=rho.max().item(),
                   broyden_diverged=bstats.diverged, broyden_reason=bstats.reason,
                   broyden_steps=bstats.nstep, phantom_lam=lam,
                   forward_rel_residual=fstats.rel_residual)
    return pd.DataFrame(records), summary


def run(cfg: SyntheticConfig, show_progress: bool = True) -> dict:
    """Both parts of the study; returns {"grid", "dynamics": DataFrame, "summary": dict}."""
    t0 = time.perf_counter()
    grid, summary = fidelity(cfg, show_progress)
    t1 = time.perf_counter()
    dyn, dyn_summary = dynamics(cfg)
    t2 = time.perf_counter()
    summary.update({f"dynamics_{k}": v for k, v in dyn_summary.items()})
    summary.update(fidelity_seconds=t1 - t0, dynamics_seconds=t2 - t1)
    return {"grid": grid, "dynamics": dyn, "summary": summary}


# --- CLI edge: files and tracking -------------------------------------------------------------

def add_arguments(parser) -> None:
    from pipeline import tracking
    parser.add_argument("--Lh", type=float, required=True)
    parser.add_argument("--params", required=True, help="the synthetic slice of params.yaml, JSON")
    parser.add_argument("--scale", default="default")
    parser.add_argument("--out", required=True, help="directory for grid.csv, dynamics.csv, summary.json")
    tracking.add_run_arguments(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def main(args) -> int:
    from pipeline import tracking
    from pipeline.config import params_hash
    from pipeline.io import write_csv, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    cfg = SyntheticConfig.from_params(args.Lh, params)
    tags = {"study": "synthetic", "scale": args.scale, "Lh": args.Lh,
            "params_hash": params_hash(params), **json.loads(args.tags)}
    out = Path(args.out)
    with tracking.start_run(args.tracking_uri, "synthetic", f"synthetic Lh={args.Lh}", tags,
                            {"synthetic": params, "Lh": args.Lh, "scale": args.scale},
                            args.artifacts, batch_size=args.tracking_batch_size) as tracker:
        result = run_and_log(cfg, tracker)
        result["summary"]["scale"] = args.scale
        write_csv(result["grid"], out / "grid.csv")
        write_csv(result["dynamics"], out / "dynamics.csv")
        write_json(result["summary"], out / "summary.json")
        for name in ("grid.csv", "dynamics.csv", "summary.json"):
            tracker.log_artifact(out / name)
    s = result["summary"]
    print(f"L_h={cfg.Lh}: forward rel residual {s['forward_rel_residual_max']:.2e} "
          f"({s['forward_steps_max']} steps), fidelity {s['fidelity_seconds']:.1f}s, "
          f"dynamics {s['dynamics_seconds']:.1f}s")
    return 0


def run_and_log(cfg: SyntheticConfig, tracker) -> dict:
    """Run the study and log its curves (step = k, or solver step) and summary."""
    result = run(cfg)
    grid, dyn = result["grid"], result["dynamics"]
    for (name, lam), part in grid.groupby(["estimator", "lam"]):
        tracker.log_curves({f"{name}_cos_lam{lam:g}": part.cos_mean.tolist(),
                        f"{name}_l2_lam{lam:g}": part.l2_mean.tolist()}, part.k.tolist())
    for method, part in dyn.groupby("method"):
        tracker.log_curves({f"{method}_{col}": part[col].tolist()
                        for col in ("objective", "rel_error", "cosine", "l1")}, part.step.tolist())
    tracker.log_metrics({k: float(v) for k, v in result["summary"].items()
                     if isinstance(v, (int, float, bool))})
    return result
