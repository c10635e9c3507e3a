"""Synthetic-study benchmark: what the (k, lambda) grid costs per pair, and how close it runs
to the machine's float32 matrix-product speed.

Run from the repository root:

    .venv/bin/python -m benchmarks.synthetic            # default shapes, about 1 min on 2 cores
    .venv/bin/python -m benchmarks.synthetic --quick    # smoke run, a few seconds
    .venv/bin/python -m benchmarks.synthetic --device cuda --pairs 250   # a paper-scale chunk

Writes ``results/benchmarks/synthetic.csv`` (with the shared writer of
``benchmarks/backward.py``) and ``figures/benchmarks/synthetic.{png,pdf}``. See
``benchmarks/README.md`` for results.

What is measured, on one chunk of ``--pairs`` pairs of params.yaml's synthetic shapes
(N x D = 32 x 128, float32, the 15 k x 10 lambda grid of UPG and NPG), L_h = 0.99:

* ``grid``: the phantom-gradient part of a chunk (``pipeline.experiments.synthetic
  .phantom_grads`` for every k and estimator), all lambda of one k in one unroll
  (``batched``) or one unroll per lambda (``unbatched``), from the same h*. ``chunk``: the
  whole chunk as the study runs it (``grid_chunk``: forward solve, exact gradient, grid).
  Seconds per pair, median of ``--repeats`` after a warm-up, the two layouts alternating.
* Achieved GFLOP/s of the grid: its matrix-product FLOPs over its time. One F = tanh((h +
  u) W) on R rows costs 2 R D^2, and so does one VJP of it; UPG A_k is k F's forward and k
  VJPs back (4 k R D^2), NPG A_k one F, k - 1 VJPs in its backward hook and one to u
  (2 (k + 1) R D^2). Elementwise work (tanh, damping) is not counted.
* ``matmul``: float32 (R x D) @ (D x D) with the grid's row counts (R = rows x pairs x
  lambda for the batched layout, rows x pairs for the unbatched one), same run, after a
  warm-up, median of ``--matmul-repeats``: the machine's speed on those shapes. The ratio
  achieved / matmul says how close the grid is to that limit.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, save_figure, write_csv
from pipeline.deq import PHANTOMS
from pipeline.experiments import synthetic as S

COLUMNS = ["case", "layout", "device", "pairs", "rows", "dim", "ks", "lams", "matmul_rows",
           "repeats", "seconds", "seconds_min", "seconds_per_pair", "gflop", "gflops",
           "matmul_gflops", "ratio_to_matmul", "batched_over_unbatched", "pairs_per_hour",
           "cpu", "cores", "threads", "torch", "load_avg", "date"]


def grid_flops(cfg: S.SyntheticConfig, pairs: int) -> float:
    """Matrix-product FLOPs of the (k, lambda) grid on ``pairs`` pairs (see the docstring)."""
    rows = cfg.rows * pairs * len(cfg.lams)
    per_row = sum(4 * k + 2 * (k + 1) for k in cfg.ks) * cfg.dim ** 2
    return float(rows * per_row)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_grid(cfg: S.SyntheticConfig, W, u_rows, y_rows, h_star, batch_lams: bool) -> float:
    _sync(cfg.device)
    t0 = time.perf_counter()
    for k in cfg.ks:
        for name in PHANTOMS:
            S.phantom_grads(cfg, W, u_rows, y_rows, h_star, name, k, batch_lams)
    _sync(cfg.device)
    return time.perf_counter() - t0


def time_matmul(rows: int, dim: int, device: str, repeats: int) -> float:
    """Median seconds of a float32 (rows x dim) @ (dim x dim) after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=g).to(device)
    w = torch.randn(dim, dim, generator=g).to(device)
    for _ in range(3):
        a @ w
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ w
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = S.SyntheticConfig(Lh=0.99, device=args.device)
    cfg = dataclasses.replace(base, pairs=args.pairs, chunk=args.pairs,
                              **({"rows": args.rows} if args.rows else {}),
                              **({"dim": args.dim} if args.dim else {}),
                              **({"ks": tuple(args.ks)} if args.ks else {}),
                              **({"lams": tuple(args.lams)} if args.lams else {}))
    log = (lambda *a: None) if args.silent else print
    info = machine(cfg.device)
    W = S.weight(cfg)
    u, y = S.make_pairs(cfg, 0, cfg.pairs)
    u_rows, y_rows = u.reshape(-1, cfg.dim), y.reshape(-1, cfg.dim)
    h_star, _, _ = S._forward(cfg, W, u_rows)
    loads = [load_average()]
    layout = {b: dataclasses.replace(cfg, batch_lams=b) for b in (True, False)}
    for batch in (True, False):  # warm-up
        time_grid(cfg, W, u_rows, y_rows, h_star, batch)
        S.grid_chunk(layout[batch], W, 0, cfg.pairs)
    grid_t = {True: [], False: []}
    chunk_t = {True: [], False: []}
    for r in range(args.repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for batch in order:
            grid_t[batch].append(time_grid(cfg, W, u_rows, y_rows, h_star, batch))
        for batch in order:
            chunk_t[batch].append(S.grid_chunk(layout[batch], W, 0, cfg.pairs)["seconds"])
        loads.append(load_average())
        log(f"repeat {r + 1}/{args.repeats}: grid batched {grid_t[True][-1]:.3f}s, unbatched "
            f"{grid_t[False][-1]:.3f}s; chunk batched {chunk_t[True][-1]:.3f}s, unbatched "
            f"{chunk_t[False][-1]:.3f}s")
    flop = grid_flops(cfg, cfg.pairs)
    rows_of = {True: cfg.rows * cfg.pairs * len(cfg.lams), False: cfg.rows * cfg.pairs}
    matmul = {b: 2 * rows_of[b] * cfg.dim ** 2 / time_matmul(rows_of[b], cfg.dim, cfg.device,
                                                              args.matmul_repeats) / 1e9
              for b in (True, False)}
    common = dict(device=cfg.device, pairs=cfg.pairs, rows=cfg.rows, dim=cfg.dim,
                  ks=" ".join(map(str, cfg.ks)), lams=" ".join(f"{x:g}" for x in cfg.lams),
                  repeats=args.repeats, cpu=info["cpu"], cores=info["cores"],
                  threads=info["threads"], torch=info["torch"],
                  load_avg=statistics.mean(loads), date=_dt.date.today().isoformat())
    out = []
    for case, times in (("grid", grid_t), ("chunk", chunk_t)):
        median = {b: statistics.median(times[b]) for b in (True, False)}
        for b in (True, False):
            row = dict(case=case, layout="batched" if b else "unbatched",
                       matmul_rows=rows_of[b], seconds=median[b], seconds_min=min(times[b]),
                       seconds_per_pair=median[b] / cfg.pairs,
                       pairs_per_hour=3600 * cfg.pairs / median[b],
                       batched_over_unbatched=median[True] / median[False], **common)
            if case == "grid":
                gflops = flop / median[b] / 1e9
                row.update(gflop=flop / 1e9, gflops=gflops, matmul_gflops=matmul[b],
                           ratio_to_matmul=gflops / matmul[b])
            out.append(row)
    for b in (True, False):
        out.append(dict(case="matmul", layout="batched" if b else "unbatched",
                        matmul_rows=rows_of[b], gflops=matmul[b], **common))
    return out


def summary(rows: list[dict]) -> str:
    get = {(r["case"], r["layout"]): r for r in rows}
    g, gu = get[("grid", "batched")], get[("grid", "unbatched")]
    c, cu = get[("chunk", "batched")], get[("chunk", "unbatched")]
    return "\n".join([
        f"grid, s/pair: batched {g['seconds_per_pair']:.4f}, unbatched "
        f"{gu['seconds_per_pair']:.4f}; batched / unbatched {g['batched_over_unbatched']:.3f}",
        f"whole chunk, s/pair: batched {c['seconds_per_pair']:.4f}, unbatched "
        f"{cu['seconds_per_pair']:.4f}; batched / unbatched {c['batched_over_unbatched']:.3f}; "
        f"50,000 pairs x 4 L_h at this rate: {4 * 50000 * c['seconds_per_pair'] / 3600:.1f} h",
        f"grid GFLOP/s: batched {g['gflops']:.2f} of {g['matmul_gflops']:.2f} for a matmul of "
        f"{g['matmul_rows']} rows ({g['ratio_to_matmul']:.2f}); unbatched {gu['gflops']:.2f} "
        f"of {gu['matmul_gflops']:.2f} at {gu['matmul_rows']} rows ({gu['ratio_to_matmul']:.2f})",
        f"{g['cpu']}, {g['cores']} cores, {g['threads']} torch threads, device {g['device']}, "
        f"load average {g['load_avg']:.1f}"])


def plot(rows: list[dict], stem: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    get = {(r["case"], r["layout"]): r for r in rows}
    layouts = ("batched", "unbatched")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, case in enumerate(("grid", "chunk")):
        axes[0].bar([i - 0.2, i + 0.2], [get[(case, lay)]["seconds_per_pair"] for lay in layouts],
                    width=0.38, color=["C0", "C1"])
    axes[0].set_xticks([0, 1], ["(k, λ) grid", "whole chunk"])
    axes[0].set_ylabel("seconds per pair (median)")
    axes[0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in ("C0", "C1")],
                   labels=["all λ in one unroll", "one unroll per λ"], fontsize=8)
    axes[1].bar([-0.2, 0.8], [get[("grid", lay)]["gflops"] for lay in layouts], width=0.38,
                color=["C0", "C1"], label="grid, achieved")
    axes[1].bar([0.2, 1.2], [get[("matmul", lay)]["gflops"] for lay in layouts], width=0.38,
                color="0.6", label="float32 matmul, same rows")
    axes[1].set_xticks([0, 1], [f"batched ({get[('matmul', 'batched')]['matmul_rows']} rows)",
                                f"unbatched ({get[('matmul', 'unbatched')]['matmul_rows']} rows)"])
    axes[1].set_ylabel("GFLOP/s")
    axes[1].set_ylim(top=1.3 * max(get[("matmul", lay)]["gflops"] for lay in layouts))
    axes[1].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"Synthetic grid: {r0['pairs']} pairs of {r0['rows']} x {r0['dim']}, float32, "
                 f"{len(r0['ks'].split())} k x {len(r0['lams'].split())} λ x UPG/NPG")
    fig.text(0.5, 0.01, f"{r0['cpu']}, {r0['cores']} cores ({r0['threads']} torch threads), "
             f"device {r0['device']}, torch {r0['torch']}; median of {r0['repeats']}; load "
             f"average {r0['load_avg']:.1f}; {r0['date']}", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 0.94))
    return save_figure(fig, stem)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 pairs of 4 x 16, k in {1, 2}, lambda in {0.5, 1}, 1 repeat")
    p.add_argument("--pairs", type=int, default=None, help="pairs in the chunk (16)")
    p.add_argument("--rows", type=int, default=None, help="N (params.yaml's 32)")
    p.add_argument("--dim", type=int, default=None, help="D (params.yaml's 128)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="k values (params.yaml's)")
    p.add_argument("--lams", type=float, nargs="+", default=None, help="lambda values")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (5)")
    p.add_argument("--matmul-repeats", type=int, default=None, help="matmul repeats (200)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-csv", type=Path, default=Path("results/benchmarks/synthetic.csv"))
    p.add_argument("--out-fig", type=Path, default=Path("figures/benchmarks/synthetic"),
                   help="figure path without extension; .png and .pdf are written")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--silent", action="store_true")
    args = p.parse_args(argv)
    full = dict(pairs=16, repeats=5, matmul_repeats=200)
    quick = dict(pairs=2, rows=4, dim=16, ks=[1, 2], lams=[0.5, 1.0], repeats=1, matmul_repeats=5)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    write_csv(rows, args.out_csv, COLUMNS)
    print(f"wrote {args.out_csv}")
    if not args.no_figure:
        for path in plot(rows, args.out_fig):
            print(f"wrote {path}")
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
