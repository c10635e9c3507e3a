"""The forward solve before and after the host-sync work, side by side on this machine.

    .venv/bin/python -m benchmarks.solver_before_after [--problem mdeq_tiny|small]
        [--solver broyden|anderson|fixed_point] [--commit bde5f74] [--repeats 15]

"Before" is ``pipeline/deq/solvers.py`` as it stood at ``--commit`` (read with ``git show``
and imported from a temporary file), "after" the working tree's: checked every step (the
default, bitwise the same results), with a fixed budget (``check_every=0``), and with the
device-side bookkeeping a GPU runs (``HOST_BOOKKEEPING_ON_CPU`` off; on the CPU the books
are kept in Python floats). Problems: ``mdeq_tiny``, MDEQ-Tiny's F at CIFAR's shape (batch
32, 32x32x3, eval mode); ``small``, a contractive tanh layer on a (300, 64) state, where
per-step overhead shows. ``--steps`` steps (22), the tolerance out of reach, so every
solve does the same work. One warm-up each, then the cases rotate through ``--repeats``
rounds; medians of wall time. The iterates of "before" and every "after" must be equal,
bit for bit. Writes ``--out-csv`` (default results/benchmarks/solver_before_after.csv).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, write_csv

COLUMNS = ["case", "problem", "solver", "median_ms", "min_ms", "repeats", "batch", "steps",
           "commit", "cpu",
           "cores", "threads", "torch", "load_avg"]


def old_solvers(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:pipeline/deq/solvers.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"solvers_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"solvers_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default="bde5f74")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--problem", choices=["mdeq_tiny", "small"], default="mdeq_tiny")
    p.add_argument("--solver", choices=["broyden", "anderson", "fixed_point"],
                   default="broyden")
    p.add_argument("--batch", type=int, default=32, help="mdeq_tiny's batch (32)")
    p.add_argument("--steps", type=int, default=22)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out-csv", type=Path,
                   default=Path("results/benchmarks/solver_before_after.csv"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.deq import SolverConfig, solve, solvers
    old = old_solvers(args.commit)
    torch.manual_seed(0)
    if args.problem == "mdeq_tiny":
        from pipeline.models.mdeq import MDEQ, MDEQConfig
        model = MDEQ(MDEQConfig.from_params({"preset": "tiny"}, in_channels=3,
                                            num_classes=10, image_size=32)).eval()
        with torch.no_grad():
            func, h0 = model.deq_problem(torch.randn(args.batch, 3, 32, 32))
    else:
        W = torch.randn(64, 64)
        W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
        u = torch.randn(300, 64)
        func, h0 = (lambda h: torch.tanh(h @ W + u)), torch.zeros(300, 64)
    method, steps = args.solver, args.steps

    def on_device():
        solvers.HOST_BOOKKEEPING_ON_CPU = False
        try:
            return solve(func, h0, SolverConfig(method, steps, 1e-12))
        finally:
            solvers.HOST_BOOKKEEPING_ON_CPU = True

    cases = {
        "before (commit)": lambda: old.solve(func, h0, old.SolverConfig(method, steps, 1e-12)),
        "after, checked every step": lambda: solve(func, h0, SolverConfig(method, steps, 1e-12)),
        "after, fixed budget (check_every=0)": lambda: solve(
            func, h0, SolverConfig(method, steps, 1e-12, check_every=0)),
        "after, device-side books (the GPU path)": on_device,
    }
    x_old, _ = cases["before (commit)"]()
    for case in list(cases)[1:]:
        x_new, _ = cases[case]()
        assert torch.equal(x_old, x_new), f"{case}: the solve must equal the old one"
    times = {name: [] for name in cases}
    loads = [load_average()]
    names = list(cases)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(1000 * (time.perf_counter() - t0))
    loads.append(load_average())
    info = machine("cpu")
    rows = [dict(case=name if "commit" not in name else f"before ({args.commit})",
                 problem=args.problem, solver=args.solver, median_ms=statistics.median(t),
                 min_ms=min(t), repeats=args.repeats,
                 batch=args.batch, steps=args.steps, commit=args.commit, cpu=info["cpu"],
                 cores=info["cores"], threads=info["threads"], torch=info["torch"],
                 load_avg=statistics.mean(loads)) for name, t in times.items()]
    write_csv(rows, args.out_csv, COLUMNS)
    for row in rows:
        print(f"{row['case']}: median {row['median_ms']:.1f} ms, min {row['min_ms']:.1f} ms")
    print(f"wrote {args.out_csv}")
    return rows


if __name__ == "__main__":
    main()
