"""IGNN (pipeline/models/ignn.py): gradients against the dense exact solve, the inf-norm
projection against a numpy port of the official one, permutation equivariance and
invariance, and the solvers' inf-norm stop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.deq import EstimatorConfig, SolverConfig, get_solver, record_layers
from pipeline.models.ignn import IGNN, IGNNConfig, ImplicitGraph, project_inf_ball

FORWARD = SolverConfig("fixed_point", 300, 3e-6, "inf")
TIGHT = SolverConfig("fixed_point", 2000, 1e-13, "inf")


def official_projection(A_np: np.ndarray, v: float) -> np.ndarray:
    """A numpy port of SwiftieH/IGNN ``utils.projection_inf_np``: per row whose l1 norm
    exceeds v, walk the sorted magnitudes to find the shift alpha."""
    A_np = A_np.copy()
    x = np.abs(A_np).sum(axis=-1)
    for idx in np.where(x > v)[0]:
        a_orig = A_np[idx, :]
        a_sign = np.sign(a_orig)
        a_abs = np.abs(a_orig)
        a = np.sort(a_abs)
        s = np.sum(a) - v
        l = float(len(a))
        for i in range(len(a)):
            if s / l > a[i]:
                s -= a[i]
                l -= 1
            else:
                break
        alpha = s / l
        A_np[idx, :] = a_sign * np.maximum(a_abs - alpha, 0)
    return A_np


def random_graph(n: int, p: float, seed: int, directed: bool = False) -> torch.Tensor:
    """A normalised (D+I)^-1/2 (A+I) (D+I)^-1/2 adjacency, dense."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, n, generator=g) < p).double()
    a.fill_diagonal_(0)
    if not directed:
        a = torch.triu(a, 1)
        a = a + a.T
    a = a + torch.eye(n, dtype=a.dtype)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def batch_of(adj: torch.Tensor, x: torch.Tensor, graph=None, num_graphs=1, lambda_pf=1.0):
    return {"x": x, "adj_t": adj.T.contiguous().to_sparse(), "lambda_pf": lambda_pf,
            "graph": torch.zeros(len(x), dtype=torch.long) if graph is None else graph,
            "num_graphs": num_graphs}


# --- the projection --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_projection_matches_the_official_numpy_loop(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64) * (0.05 + seed)
    radius = 0.9 / (1 + seed)
    ours = project_inf_ball(w, radius)
    np.testing.assert_allclose(ours.numpy(), official_projection(w.numpy(), radius),
                               rtol=1e-12, atol=1e-12)


def test_projection_maps_any_W_into_the_ball_and_keeps_one_inside():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.1, 1.0, 100.0):
        w = torch.randn(32, 32, generator=g, dtype=torch.float64) * scale
        p = project_inf_ball(w, 0.9)
        assert p.abs().sum(1).max() <= 0.9 * (1 + 1e-12)
        # rows outside land on the sphere; rows inside are untouched
        inside = w.abs().sum(1) <= 0.9
        torch.testing.assert_close(p[inside], w[inside], rtol=0, atol=0)
        torch.testing.assert_close(p.abs().sum(1)[~inside],
                                   torch.full(((~inside).sum(),), 0.9, dtype=w.dtype))
        # idempotent, and the nearest point: no other point of the ball on a random segment is closer
        torch.testing.assert_close(project_inf_ball(p, 0.9), p)
    inner = torch.randn(8, 8, generator=g, dtype=torch.float64)
    inner = inner / inner.abs().sum(1, keepdim=True) * 0.5
    assert torch.equal(project_inf_ball(inner, 0.9), inner)


def test_projection_is_the_nearest_point_of_the_ball():
    """KKT check per row: w - p is theta sign(p) on the support of p and at most theta off it."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 12, generator=g, dtype=torch.float64) * 2
    p = project_inf_ball(w, 0.7)
    for row_w, row_p in zip(w, p):
        support = row_p != 0
        shift = (row_w - row_p)[support] * row_p[support].sign()
        theta = shift[0]
        torch.testing.assert_close(shift, torch.full_like(shift, theta.item()))
        assert (row_w[~support].abs() <= theta + 1e-12).all()


def test_layer_projects_W_before_every_forward_with_kappa_over_lambda_pf():
    layer = ImplicitGraph(3, 8, kappa=0.9)
    with torch.no_grad():
        layer.W.mul_(50)
    adj = random_graph(6, 0.5, 0)
    layer(torch.randn(3, 6), adj.T.float().to_sparse(), 2.0, FORWARD, EstimatorConfig("upg"))
    assert layer.W.abs().sum(1).max().item() <= 0.45 * (1 + 1e-6)


# --- gradients ---------------------------------------------------------------------------------

def _layer_grads(estimator: EstimatorConfig, solver: SolverConfig, seed: int = 0,
                 directed: bool = False):
    torch.manual_seed(seed)
    n, p, m = 7, 3, 5
    layer = ImplicitGraph(p, m, kappa=0.9).double()
    with torch.no_grad():
        layer.W.mul_(10)  # well outside the ball: the projection is active
    adj = random_graph(n, 0.4, seed, directed)
    lambda_pf = float(torch.linalg.eigvals(adj).abs().max())
    u = torch.randn(p, n, dtype=torch.float64)
    target = torch.randn(m, n, dtype=torch.float64)
    x, stats = layer(u, adj.T.contiguous().to_sparse(), lambda_pf, solver, estimator)
    loss = ((x - target) ** 2).sum()
    loss.backward()
    return layer.W.grad.clone(), layer.Omega.grad.clone(), stats


@pytest.mark.parametrize("directed", [False, True])
def test_implicit_gradient_of_one_layer_matches_exact(directed):
    """IGNN's backward (fixed-point iteration on the VJP system, same budget, inf stop)
    against the dense solve of (I - J^T) g = dL/dX, on a small graph; a directed A too,
    where the VJP stays exact (the official G A^T form assumes nothing, we assume nothing)."""
    implicit = EstimatorConfig("implicit", b_solver="fixed_point", b_max_iter=2000, b_tol=1e-13,
                               b_stop_mode="inf")
    w_i, o_i, stats = _layer_grads(implicit, TIGHT, directed=directed)
    w_e, o_e, _ = _layer_grads(EstimatorConfig("exact"), TIGHT, directed=directed)
    assert stats.converged and stats.inf_residual <= 1e-13
    torch.testing.assert_close(w_i, w_e, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(o_i, o_e, rtol=1e-9, atol=1e-11)
    assert w_e.abs().max() > 1e-3  # a gradient worth comparing


def test_upg_with_many_undamped_steps_approaches_the_exact_gradient():
    """A_{k,1} -> the implicit gradient as k grows for a contraction (appendix Theorem 1)."""
    w_e, _, _ = _layer_grads(EstimatorConfig("exact"), TIGHT)
    errors = []
    for k in (1, 5, 40):
        w_u, _, _ = _layer_grads(EstimatorConfig("upg", k=k, lam=1.0), TIGHT)
        errors.append(((w_u - w_e).norm() / w_e.norm()).item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors


# --- permutations ------------------------------------------------------------------------------

def _two_graph_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    a1, a2 = random_graph(5, 0.5, seed), random_graph(4, 0.6, seed + 1)
    adj = torch.block_diag(a1, a2).float()
    x = torch.randn(9, 3, generator=g)
    graph = torch.tensor([0] * 5 + [1] * 4)
    return adj, x, graph


@pytest.mark.parametrize("preset", ["graph", "ppi", "chains"])
def test_permuting_nodes_permutes_node_outputs_and_keeps_graph_outputs(preset):
    readout = "graph" if preset == "graph" else "node"
    torch.manual_seed(0)
    model = IGNN(IGNNConfig.from_params({"preset": preset, "hidden": 8}, in_features=3,
                                        num_classes=2, readout=readout)).eval()
    adj, x, graph = _two_graph_batch(0)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    adj_p = adj[perm][:, perm]
    out, _ = model(batch_of(adj, x, graph, 2), FORWARD, EstimatorConfig("implicit"))
    out_p, _ = model(batch_of(adj_p, x[perm], graph[perm], 2), FORWARD,
                     EstimatorConfig("implicit"))
    if readout == "graph":
        torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out_p, out[perm], rtol=1e-5, atol=1e-5)


def test_a_batch_solves_one_state_per_layer_and_records_every_layer():
    model = IGNN(IGNNConfig(in_features=3, num_classes=2, hidden=6)).train()
    adj, x, graph = _two_graph_batch(1)
    with record_layers() as layers:
        logits, _ = model(batch_of(adj, x, graph, 2), FORWARD,
                          EstimatorConfig("implicit", b_solver="fixed_point", b_max_iter=300,
                                          b_tol=3e-6, b_stop_mode="inf"))
    assert [tuple(r.h_star.shape) for r in layers] == [(1, 6, 9)] * 3
    assert all(r.stats.converged and r.stats.inf_residual < 3e-6 for r in layers)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_presets_and_refusals():
    assert IGNNConfig.from_params({"preset": "ppi"}, in_features=50, num_classes=121,
                                  readout="node").hidden == 256
    with pytest.raises(ValueError, match="unknown IGNN model keys \\['width'\\]"):
        IGNNConfig.from_params({"width": 3})
    with pytest.raises(ValueError, match="model preset 'big'"):
        IGNNConfig.from_params({"preset": "big"})
    with pytest.raises(ValueError, match="kappa=1.0"):
        IGNNConfig(kappa=1.0)


# --- the inf-norm stop of the solvers ----------------------------------------------------------

@pytest.mark.parametrize("name", ["fixed_point", "anderson", "broyden"])
def test_inf_stop_mode_stops_on_the_largest_absolute_change(name):
    W = torch.full((6, 6), 0.1)
    f = lambda h: torch.tanh(h @ W) + 1.0  # noqa: E731
    x, stats = get_solver(name)(f, torch.zeros(2, 6), 300, 1e-7, "inf")
    assert stats.converged
    assert (f(x) - x).abs().max().item() <= 1e-7
    assert stats.inf_trace[-1] == stats.inf_residual and len(stats.inf_trace) == len(stats.abs_trace)


def test_inf_stop_mode_is_refused_for_gmres():
    with pytest.raises(ValueError, match="stop_mode='inf'"):
        SolverConfig("gmres", stop_mode="inf")


# --- the benchmark's IGNN configurations ---------------------------------------------------------

def test_backward_benchmark_runs_the_ignn_configs(tmp_path, repo_root):
    """``python -m benchmarks.backward --config ignn_graph --quick``: the command runs and
    writes one row per estimator; what it measures is not checked (a shared machine)."""
    import csv
    import subprocess
    import sys
    out = tmp_path / "ignn_graph.csv"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.backward", "--config", "ignn_graph",
                           "--quick", "--out-csv", str(out)], cwd=repo_root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["estimator"] for r in rows] == ["implicit", "upg", "npg", "implicit_rel"]
    assert float(rows[0]["backward_ratio_implicit_over_this"]) == 1.0
    assert all(float(r["project_share"]) > 0 and float(r["peak_mem_mb"]) > 0 for r in rows)
    assert "backward implicit/UPG" in proc.stdout
