"""What the training diagnostics cost, and how good their reference is.

Run by ``benchmarks/backward.py`` (and on its own: ``.venv/bin/python -m benchmarks.diagnostics``);
writes ``results/benchmarks/diagnostics.csv``. See ``benchmarks/README.md`` for results.

1. **Diagnostics / training step** (``part = cost``): the shared loop itself trains UPG
   A_{5,0.5} (SGD, no pretraining, as the ``upg_sgd`` ablation) with diagnostics every
   ``--every`` steps, and its curves give the median time of a diagnostics call
   (``time/diagnostics_s``: GMRES reference in float64, cosines, repeat-timed backward,
   spectral radii) and of a diagnostics-free training step (``time/step_s``). At the
   default scale (scikit-learn digits, 8x8x1, batch 32) and at MDEQ-Tiny's CIFAR shape
   (32x32x3, random images, batch ``--cifar-batch``).
2. **GMRES reference vs the 60-step Broyden reference** (``part = reference``), on the
   ``no_pretrain`` ablation trained for each of ``--diag-train-steps`` steps (a run each,
   its cosine schedule over that many steps; rho(dF/dh) is near or above 1 there), one
   batch and one h* per state: the backward system (I - J^T) g = dL/dh solved by Broyden with
   b_thres 24 (the run's own gradient), by Broyden with 60 steps and tol 1e-6 (the
   reference the diagnostics used before GMRES), and by GMRES (float64, tol 1e-8,
   restart 400). For each: wall time (median of 3), the worst per-sample relative
   residual ||(I - J^T) g - dL/dh|| / ||dL/dh|| measured in float64 for all three,
   and the cosine of its F-parameter gradient with GMRES's.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, write_csv
from pipeline import tracking as M
from pipeline.data.digits import export_digits
from pipeline.data.layout import write_dataset
from pipeline.deq import SolverConfig, solve
from pipeline.experiments.checkpoint import load_checkpoint
from pipeline.experiments.tasks import get_task
from pipeline.experiments.train import train
from pipeline.experiments.train_config import TrainConfig
from pipeline.models.mdeq import unpack
from pipeline.tracking import NullRun

COLUMNS = ["part", "shape", "batch", "case", "steps", "diagnostics", "step_s",
           "diagnostics_s", "diagnostics_over_step", "ref_nsteps", "ref_rel_residual",
           "time_s", "rel_residual", "cos_F_vs_gmres", "rho", "cpu", "threads", "torch"]


def _data(root: Path, shape: str) -> Path:
    if shape == "digits":
        out = root / "digits"
        export_digits(out, 0.2, 0)
        return out
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(512, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=512).astype(np.int64)
    out = root / "cifar_shape"
    # 8 test images: the loop evaluates after its steps, and no row reads that evaluation
    write_dataset(out, name="cifar_shape", classes=[str(i) for i in range(10)],
                  train=(images[:448], labels[:448]), test=(images[448:456], labels[448:456]),
                  source="random uint8 images, seed 0 (benchmark)")
    return out


def cost_rows(root: Path, shape: str, batch: int, steps: int, every: int, log,
              ref_max_iter: int = 1000) -> dict:
    data = _data(root, shape)
    params = {"data": {"dataset": data.name}, "epochs": 1, "max_steps": steps, "batch_size": batch,
              "estimator": "upg", "pretrain_steps": 0, "optimizer": "sgd", "lr": 0.1,
              "weight_decay": 1e-4, "diagnostics_every": every, "eval_batch_size": 64,
              "reference_max_iter": ref_max_iter}
    cfg = TrainConfig.from_params(params)
    task = get_task("image")(cfg.model, cfg.data, data, "cpu", batch, 64, 0)
    res = train(cfg, task, NullRun(), None, log=lambda _: None)
    curves = res["curves"]
    step_s = statistics.median(r[M.TIME_STEP] for r in curves if M.TIME_STEP in r)
    diag = [r for r in curves if M.TIME_DIAGNOSTICS in r]
    diag_s = statistics.median(r[M.TIME_DIAGNOSTICS] for r in diag)
    row = dict(part="cost", shape=shape, batch=batch, case="upg A5,0.5", steps=len(curves),
               diagnostics=len(diag), step_s=step_s, diagnostics_s=diag_s,
               diagnostics_over_step=diag_s / step_s,
               ref_nsteps=statistics.median(r[M.GRAD_REF_NSTEPS] for r in diag),
               ref_rel_residual=max(r[M.GRAD_REF_REL_RESIDUAL] for r in diag),
               rho=statistics.median(r[M.RHO] for r in diag))
    log(f"{shape} batch {batch}: diagnostics {diag_s:.2f} s / step {step_s:.3f} s = "
        f"{diag_s / step_s:.0f}x (GMRES {row['ref_nsteps']:.0f} steps, rho {row['rho']:.2f})")
    return row


def reference_rows(root: Path, batch: int, train_steps: int, log) -> list[dict]:
    data = root / "digits"
    if not data.exists():
        data = _data(root, "digits")
    params = {"max_steps": train_steps, "epochs": 100, "batch_size": batch, "pretrain_steps": 0,
              "diagnostics_every": 0}
    cfg = TrainConfig.from_params(params)  # the no_pretrain ablation: implicit, Adam, dropout
    task = get_task("image")(cfg.model, cfg.data, data, "cpu", batch, 500, 0)
    ck = root / "no_pretrain.pt"
    train(cfg, task, NullRun(), ck, log=lambda _: None)
    model = task.build_model()
    model.load_state_dict(load_checkpoint(ck)["model"])
    model.train()
    x, y = next(iter(task.batches("train", 0)))

    def problem(m, dtype):
        torch.manual_seed(1)  # the same dropout masks in both precisions
        func, h0, shapes = m.problem(x.to(dtype))
        return func, h0, shapes

    m64 = copy.deepcopy(model).double()
    func32, h0, shapes = problem(model, torch.float32)
    h_star, _ = solve(func32, h0, cfg.forward_solver)
    func64, _, _ = problem(m64, torch.float64)
    h64 = h_star.double().requires_grad_()
    y64 = func64(h64)
    loss = torch.nn.functional.cross_entropy(m64.head(unpack(h64, shapes)), y)
    v64 = torch.autograd.grad(loss, h64, retain_graph=True)[0]
    h32 = h_star.detach().requires_grad_()
    y32 = func32(h32)

    def vjp32(g):
        return torch.autograd.grad(y32, h32, g, retain_graph=True)[0]

    def vjp64(g):
        return torch.autograd.grad(y64, h64, g, retain_graph=True)[0]

    from pipeline.deq import jacobian_spectral_radius
    rho = jacobian_spectral_radius(func32, h_star, iters=60).mean().item()
    cases = {
        "implicit, Broyden b_thres 24 (the run's)": (SolverConfig("broyden", 24, 1e-3), 32),
        "Broyden 60 steps, tol 1e-6 (old reference)": (SolverConfig("broyden", 60, 1e-6), 32),
        "GMRES float64, tol 1e-8, restart 400 (reference)": (
            SolverConfig("gmres", 1000, 1e-8, restart=400), 64),
    }
    out, grads = [], {}
    for name, (solver, bits) in cases.items():
        vjp, v = (vjp32, v64.float()) if bits == 32 else (vjp64, v64)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            g, stats = solve(lambda g: vjp(g) + v, torch.zeros_like(v), solver)
            times.append(time.perf_counter() - t0)
        g = g.double()
        with torch.no_grad():
            r = g - vjp64(g) - v64
        rel = (r.norm(dim=1) / v64.norm(dim=1)).max().item()
        grads[name] = torch.cat([p.flatten() for p in torch.autograd.grad(
            y64, list(m64.cell.parameters()), g, retain_graph=True)])
        out.append(dict(part="reference", shape="digits", batch=batch, case=name,
                        steps=train_steps, time_s=statistics.median(times), rel_residual=rel,
                        ref_nsteps=stats.nstep, rho=rho))
    ref = grads[list(cases)[-1]]
    for row in out:
        g = grads[row["case"]]
        row["cos_F_vs_gmres"] = (g @ ref / (g.norm() * ref.norm())).item()
        log(f"{row['case']}: {row['time_s']:.2f} s, residual {row['rel_residual']:.2e}, "
            f"cos F vs GMRES {row['cos_F_vs_gmres']:.4f} (rho {rho:.2f})")
    return out


def run(args, log=print) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows.append(cost_rows(root, "digits", args.batch, args.steps, args.every, log,
                              args.ref_max_iter))
        rows.append(cost_rows(root, "cifar_shape", args.cifar_batch, args.cifar_steps,
                              args.every, log, args.ref_max_iter))
        for steps in args.train_steps:
            rows += reference_rows(root, args.batch, steps, log)
    for r in rows:
        r.update(cpu=info["cpu"], threads=info["threads"], torch=info["torch"])
    return rows


def add_arguments(p: argparse.ArgumentParser, quick: bool) -> None:
    full = dict(batch=32, steps=41, every=10, cifar_batch=8, cifar_steps=11,
                train_steps=[20, 40, 60, 100], ref_max_iter=1000)
    # --quick: a smoke run; the GMRES reference at the CIFAR shape stops at 100 steps
    small = dict(batch=8, steps=3, every=2, cifar_batch=2, cifar_steps=3, train_steps=[4],
                 ref_max_iter=100)
    for key, value in (small if quick else full).items():
        p.add_argument(f"--diag-{key.replace('_', '-')}", dest=f"diag_{key}", type=int,
                       default=value, nargs="+" if isinstance(value, list) else None)
    p.add_argument("--diag-csv", type=Path, default=Path("results/benchmarks/diagnostics.csv"))


def from_backward_args(args) -> argparse.Namespace:
    return argparse.Namespace(**{k.removeprefix("diag_"): v for k, v in vars(args).items()
                                 if k.startswith("diag_")}, threads=args.threads)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    known, _ = p.parse_known_args(argv)
    add_arguments(p, known.quick)
    args = from_backward_args(p.parse_args(argv))
    rows = run(args)
    write_csv(rows, args.csv, COLUMNS)
    print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
