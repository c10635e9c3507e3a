"""IGNN backward benchmark: implicit differentiation against UPG and NPG on IGNN's layers.

    .venv/bin/python -m benchmarks.backward --config ignn_graph     # COX2-shaped batch
    .venv/bin/python -m benchmarks.backward --config ignn_ppi       # PPI-shaped graph
    .venv/bin/python -m benchmarks.backward --config ignn_graph --quick

Shapes (synthetic graphs, so the benchmark needs no download):

* ``ignn_graph``: a batch of 128 random graphs of ~41 nodes (COX2's mean; ~43 undirected
  edges each), 35 one-hot node features, the (D+I)^-1/2 (A+I) (D+I)^-1/2 adjacency
  (lambda_pf = 1); the ``graph`` preset: 3 layers, hidden 64, kappa 0.9.
* ``ignn_ppi``: one graph of 2,300 nodes with PPI's mean degree (~28), 50 features,
  121 labels, the raw 0/1 adjacency (lambda_pf by eigen-solve); the ``ppi`` preset:
  5 layers, hidden 256, kappa 0.98, skips.

The model is trained briefly first (``--warm-steps`` Adam steps with UPG), so the
backward systems are those of a model that has left its initialisation. Then, per
estimator (implicit with IGNN's backward: fixed-point iteration, 300 steps, max |change| <
3e-6; UPG A_{5,0.5}; NPG A_{5,0.5}; ``implicit_rel``: the same iteration to a relative
1e-6, for comparison), one training step is timed ``--repeats`` times
(rotating the order): the forward (``forward_s``: the fixed-point solves, IGNN's 300 / 3e-6,
and the projections), ``backward_s`` (``loss.backward()``), and the share of the step spent
projecting W (``project_s``, timed around the projections). Peak tensor memory of one step
(``pipeline.memory.peak_memory``'s counter on the CPU, CUDA's allocator on a GPU) has its
own pass. Reported: backward implicit / UPG and implicit / NPG, the forward iterations per
layer, the peak memory UPG / implicit, the projection share.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_csv
from pipeline.deq import EstimatorConfig, SolverConfig
from pipeline.experiments.graph_tasks import normalized_edges, perron_frobenius
from pipeline.memory import peak_memory
from pipeline.models.ignn import IGNN, IGNNConfig, ImplicitGraph

CONFIGS = {
    "ignn_graph": dict(preset="graph", readout="graph", graphs=128, nodes=41, degree=2.1,
                       features=35, classes=2, adjacency="aug_normalized"),
    "ignn_ppi": dict(preset="ppi", readout="node", graphs=1, nodes=2300, degree=28.0,
                     features=50, classes=121, adjacency="raw"),
}
QUICK = {"ignn_graph": dict(graphs=8, nodes=12), "ignn_ppi": dict(nodes=200, degree=6.0)}
COLUMNS = ["config", "estimator", "k", "lam", "graphs", "nodes", "edges", "layers", "hidden",
           "repeats", "forward_s", "backward_s", "step_s", "project_s", "project_share",
           "fwd_nsteps_per_layer", "bwd_nsteps_per_layer", "peak_mem_mb",
           "backward_ratio_implicit_over_this", "peak_mem_ratio_this_over_implicit",
           "device", "threads", "torch"]


def random_batch(spec: dict, device: str, seed: int) -> dict:
    """Block-diagonal random graphs with the spec's sizes, features one-hot (graph) or
    Gaussian (node), in the batch dict the IGNN model takes."""
    rng = np.random.default_rng(seed)
    edges, start, graph = [], 0, []
    for g in range(spec["graphs"]):
        n = max(2, int(rng.normal(spec["nodes"], spec["nodes"] * 0.2)))
        m = int(n * spec["degree"] / 2)
        a, b = rng.integers(0, n, size=(2, m))
        keep = a != b
        pair = np.stack([a[keep], b[keep]]) + start
        edges.append(np.concatenate([pair, pair[::-1]], axis=1))
        graph += [g] * n
        start += n
    n = start
    edges = np.unique(np.concatenate(edges, axis=1), axis=1)
    full, weights = normalized_edges(edges, n, spec["adjacency"])
    lam = 1.0 if spec["adjacency"] == "aug_normalized" else perron_frobenius(full, weights, n)
    adj_t = torch.sparse_coo_tensor(torch.from_numpy(np.stack([full[1], full[0]])),
                                    torch.from_numpy(weights).float(), (n, n),
                                    check_invariants=False).coalesce()
    if spec["readout"] == "graph":
        x = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, spec["features"], n)),
                                        spec["features"]).float()
        y = torch.from_numpy(rng.integers(0, spec["classes"], spec["graphs"]))
    else:
        x = torch.from_numpy(rng.normal(size=(n, spec["features"]))).float()
        y = torch.from_numpy(rng.integers(0, 2, size=(n, spec["classes"]))).float()
    return {"x": x.to(device), "adj_t": adj_t.to(device), "lambda_pf": lam,
            "graph": torch.tensor(graph, device=device), "num_graphs": spec["graphs"],
            "y": y.to(device), "edges": int(edges.shape[1])}


def loss_of(model, batch, solver, est, backward_stats=None):
    out, _ = model(batch, solver, est, backward_stats)
    if model.config.readout == "graph":
        return torch.nn.functional.cross_entropy(out, batch["y"])
    return torch.nn.functional.binary_cross_entropy_with_logits(out, batch["y"])


class ProjectionClock:
    """Times every ``ImplicitGraph.project_`` call (patched for the benchmark's duration)."""

    def __init__(self, device: str):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        self.original = ImplicitGraph.project_
        clock = self

        def timed(layer, lambda_pf):
            t0 = _now(clock.device)
            clock.original(layer, lambda_pf)
            clock.seconds += _now(clock.device) - t0

        ImplicitGraph.project_ = timed
        return self

    def __exit__(self, *exc):
        ImplicitGraph.project_ = self.original


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run(args) -> list[dict]:
    spec = {**CONFIGS[args.config], **(QUICK[args.config] if args.quick else {})}
    torch.manual_seed(args.seed)
    batch = random_batch(spec, args.device, args.seed)
    cfg = IGNNConfig.from_params({"preset": spec["preset"]}, in_features=spec["features"],
                                 num_classes=spec["classes"], readout=spec["readout"])
    model = IGNN(cfg).to(args.device).train()
    solver = SolverConfig("fixed_point", 300, 3e-6, "inf")
    estimators = {
        "implicit": EstimatorConfig("implicit", b_solver="fixed_point", b_max_iter=300,
                                    b_tol=3e-6, b_stop_mode="inf"),
        "upg": EstimatorConfig("upg", k=5, lam=0.5),
        "npg": EstimatorConfig("npg", k=5, lam=0.5),
        # IGNN's backward stops on an absolute max |change| < 3e-6 of dL/dX, which for a
        # mean loss over many nodes is met after a few iterations; the same iteration to a
        # relative 1e-6 shows what a converged backward costs
        "implicit_rel": EstimatorConfig("implicit", b_solver="fixed_point", b_max_iter=300,
                                        b_tol=1e-6, b_stop_mode="rel"),
    }
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.warm_steps):             # leave the initialisation
        opt.zero_grad()
        loss_of(model, batch, solver, estimators["upg"]).backward()
        opt.step()
    from pipeline.deq import record_layers  # noqa: E402
    times = {name: {"forward": [], "backward": [], "project": []} for name in estimators}
    steps = {}
    names = list(estimators)
    for rep in range(args.repeats + 1):          # repeat 0 warms up
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            model.zero_grad(set_to_none=True)
            backward_stats: list = []
            with ProjectionClock(args.device) as proj, record_layers() as layers:
                t0 = _now(args.device)
                loss = loss_of(model, batch, solver, estimators[name], backward_stats)
                t1 = _now(args.device)
            loss.backward()
            t2 = _now(args.device)
            if rep:
                times[name]["forward"].append(t1 - t0)
                times[name]["backward"].append(t2 - t1)
                times[name]["project"].append(proj.seconds)
            steps[name] = (sum(r.stats.nstep for r in layers) / len(layers),
                           sum(s.nstep for s in backward_stats) / len(layers)
                           if backward_stats else 0.0)
    memory = {}
    for name in names:
        model.zero_grad(set_to_none=True)
        with peak_memory(args.device) as mem:
            loss_of(model, batch, solver, estimators[name]).backward()
        memory[name] = mem.peak_mb
    rows = []
    for name in names:
        t = {k: statistics.median(v) for k, v in times[name].items()}
        step = t["forward"] + t["backward"]
        est = estimators[name]
        rows.append({
            "config": args.config, "estimator": name,
            "k": est.k if name != "implicit" else "", "lam": est.lam if name != "implicit" else "",
            "graphs": spec["graphs"], "nodes": int(batch["x"].shape[0]), "edges": batch["edges"],
            "layers": cfg.num_layers, "hidden": cfg.hidden, "repeats": args.repeats,
            "forward_s": t["forward"], "backward_s": t["backward"], "step_s": step,
            "project_s": t["project"], "project_share": t["project"] / step,
            "fwd_nsteps_per_layer": steps[name][0], "bwd_nsteps_per_layer": steps[name][1],
            "peak_mem_mb": memory[name],
            "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        })
    implicit = rows[0]
    for r in rows:
        r["backward_ratio_implicit_over_this"] = implicit["backward_s"] / r["backward_s"]
        if r["estimator"] == "implicit_rel":
            r["k"] = "rel 1e-6"
        r["peak_mem_ratio_this_over_implicit"] = r["peak_mem_mb"] / implicit["peak_mem_mb"]
    return rows


def summary(rows: list[dict]) -> str:
    by = {r["estimator"]: r for r in rows}
    imp, upg, npg = by["implicit"], by["upg"], by["npg"]
    return (f"{rows[0]['config']}: {imp['nodes']} nodes, {imp['layers']} layers x {imp['hidden']}; "
            f"forward {imp['fwd_nsteps_per_layer']:.1f} iterations per layer, implicit backward "
            f"{imp['bwd_nsteps_per_layer']:.1f}; backward implicit/UPG "
            f"{imp['backward_s'] / upg['backward_s']:.2f}x, implicit/NPG "
            f"{imp['backward_s'] / npg['backward_s']:.2f}x; peak memory UPG/implicit "
            f"{upg['peak_mem_mb'] / imp['peak_mem_mb']:.2f}; projection "
            f"{100 * imp['project_share']:.1f}% of the implicit step, "
            f"{100 * upg['project_share']:.1f}% of the UPG step; implicit to a relative 1e-6: "
            f"{by['implicit_rel']['bwd_nsteps_per_layer']:.1f} iterations per layer, backward "
            f"{by['implicit_rel']['backward_s'] / upg['backward_s']:.2f}x UPG's")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warm-steps", type=int, default=20, help="Adam steps before timing (20)")
    p.add_argument("--device", default="cpu")


def main(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.quick:
        args.warm_steps = min(args.warm_steps, 2)
    rows = run(args)
    out = args.out_csv if args.out_csv != Path("results/benchmarks/backward.csv") \
        else Path(f"results/benchmarks/{args.config}.csv")
    write_csv(rows, out, COLUMNS)
    print(f"wrote {out}")
    print(summary(rows))
    return rows
