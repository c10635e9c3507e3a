"""Backward-pass benchmark: implicit differentiation vs phantom gradients on MDEQ-Tiny's F.

Run from the repository root:

    .venv/bin/python -m benchmarks.backward            # full run, about 10 min on 2 idle CPU cores
    .venv/bin/python -m benchmarks.backward --quick    # smoke run, about 10 s
    .venv/bin/python -m benchmarks.backward --config large_cifar --device cuda    # MDEQ (large)
    .venv/bin/python -m benchmarks.backward --config small_imagenet --device cuda # MDEQ-Small

``--config large_cifar`` / ``small_imagenet`` (the vision issue): the LARGE CIFAR-10 and the
MDEQ-Small ImageNet configurations at their real shapes and official budgets (32x32 at batch
32, f/b_thres 18/20, lam 0.5; 224x224 at batch 16, f/b_thres 26/27, lam 0.6), k in {1, 5, 10}
by default; ``--device cuda`` runs on a GPU (times after ``torch.cuda.synchronize``, peak
memory from CUDA's allocator). The run ends with the DDP step time, 2 gloo CPU ranks / 1
process (``benchmarks/ddp.py``; ``--no-ddp`` skips it).

Writes ``results/benchmarks/backward.csv`` and ``figures/benchmarks/backward.{png,pdf}``
(``--out-csv`` and ``--out-fig`` move them). See ``benchmarks/README.md`` for results.

What is measured
----------------
The DEQ is MDEQ-Tiny's equilibrium module F (two branches of 24 channels at 32x32
and 16x16, group norm, weight-normed convs; 30,720 unknowns per sample):
``pipeline.models.mdeq.MDEQ(MDEQConfig()).deq_problem(x)`` when that module imports,
else the stand-in ``benchmarks/conv_cell.py`` (``--model`` chooses; the CSV says which).
Batch 32, float32, CPU. Every solve and every gradient step rebuilds the problem
(stem forward) from one seed, so all of them see the same F and dropout masks:

* ``forward_s``: the no-grad forward solve, Broyden with f_thres 22 steps, ours
  (``pipeline.deq.solve``) and TorchDEQ's (its ``broyden`` through ``DEQIndexing``
  in eval mode). The tolerance is below float32's reach, so both run all 22 steps
  and the comparison is of equal work.
* For each estimator, from *our* z* (the same z* for every estimator and for TorchDEQ):
  ``est_forward_s``, the estimator's own forward work (UPG's k damped steps under
  autograd, the one F call of NPG / implicit), timed from the first grad-enabled call
  of F; ``backward_s``, ``loss.backward()`` (for ``implicit``: the Broyden solve of
  the backward linear system, b_thres 24; for ``npg``: k-1 VJPs; for ``upg``:
  backprop through the k steps); ``grad_s = est_forward_s + backward_s``, the whole
  cost of the gradient once h* is known. ``step_s = forward_s + grad_s``.
  Ours attaches the estimator to z* with ``pipeline.deq.attach_estimator`` (what
  ``implicit_layer`` does after its solve); TorchDEQ gets z* through a registered
  solver ``given`` that returns its initial state, the same trick as
  ``tests/test_torchdeq_crosscheck.py``.
* Estimators: ``implicit`` (Broyden, b_thres 24), ``upg`` A_{k,lam}, ``npg`` A_{k,lam}
  for k in ``--ks`` (lam = 0.5), ``jfb``; TorchDEQ: ``ift=True`` (implicit),
  ``grad=k, tau=lam`` (UPG; JFB is grad=1, tau=1). TorchDEQ has no NPG.
* Wall-clock and CPU time (``time.process_time``, all threads) are both recorded:
  medians over ``--repeats`` repeats (``*_s``, ``*_cpu_s``) and the best of them
  (``*_min_s``), which on a shared machine is the better estimate of the cost itself.
  Cases compared with each other (ours and TorchDEQ at one k, NPG at that k) run back
  to back; the groups rotate from repeat to repeat and the order inside a group
  reverses, so a slow spell of a shared machine does not always hit the same case.

Peak memory (``peak_mem_mb``)
-----------------------------
CPU PyTorch has no allocator statistics, so a ``TorchDispatchMode`` counts tensor
memory: every tensor an ATen op returns whose storage is new (not one of the op's
inputs' storages) adds its storage's bytes, and a weak-reference finaliser on the
storage subtracts them when it is freed. This sees every tensor autograd saves for
backward, every temporary of the backward (VJPs, Broyden's low-rank buffers) and the
parameter gradients, forward and backward alike; it does not see scratch space that
an op allocates and frees internally (e.g. a convolution's workspace), nor tensors
made before the measurement starts (parameters, input, the stem's activations).
``peak_mem_mb`` is the peak of live counted bytes from the first grad-enabled call
of F to the end of ``backward()``: the memory the estimator needs on top of the
model, the input and z*. ``solve_mem_mb`` is the same count over the no-grad forward
solve (Broyden's buffers dominate it). Memory is measured in a separate pass of one
step per case, so the tracker's overhead never enters a timing.

Targets (reported, not asserted): UPG A_{5,0.5} ``grad_s`` at least 2x faster than
implicit with b_thres 24; NPG peak memory flat in k (within 10% from k=1 to 20)
while UPG's grows; our step no slower than TorchDEQ's (ratio <= 1).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.deq import EstimatorConfig, SolverConfig, attach_estimator, solve
from pipeline.io import write_json
from pipeline.memory import TensorMemory

from benchmarks import ddp, diagnostics
from benchmarks.common import device_text, load_average, machine, save_figure, write_csv

Tensor = torch.Tensor

COLUMNS = [
    "estimator", "k", "lam", "impl", "model", "batch", "state_size", "f_thres", "b_thres",
    "repeats", "forward_s", "est_forward_s", "backward_s", "grad_s", "step_s",
    "forward_cpu_s", "est_forward_cpu_s", "backward_cpu_s", "grad_cpu_s", "step_cpu_s",
    "forward_min_s", "grad_min_s", "forward_cpu_min_s", "grad_cpu_min_s",
    "peak_mem_mb", "solve_mem_mb", "fwd_nstep", "fwd_rel_residual", "bwd_nstep",
    "grad_speedup_vs_implicit", "grad_speedup_vs_implicit_cpu",
    "grad_ratio_ours_over_torchdeq", "grad_ratio_ours_over_torchdeq_cpu",
    "step_ratio_ours_over_torchdeq", "step_ratio_ours_over_torchdeq_cpu",
    "cpu", "cores", "threads", "torch", "torchdeq", "load_avg", "config", "device", "gpu",
    "check_every", "graph",
]


# --------------------------------------------------------------------------- measurement


def _sync() -> None:
    """Wait for the GPU's queued work before a clock is read (no-op on the CPU)."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize(DEVICE)


DEVICE = "cpu"  # set by run() from --device


class CudaMemory:
    """:class:`~pipeline.memory.TensorMemory`'s interface from CUDA's allocator: bytes
    above the level at entry, ``peak`` and, after ``mark()``, ``peak_since_mark``."""

    def __enter__(self):
        _sync()
        self.base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        self.peak = self.peak_since_mark = 0
        return self

    def mark(self) -> None:
        _sync()
        self.peak = torch.cuda.max_memory_allocated(DEVICE) - self.base
        self.peak_since_mark = torch.cuda.memory_allocated(DEVICE) - self.base
        torch.cuda.reset_peak_memory_stats(DEVICE)

    def __exit__(self, *exc):
        _sync()
        top = torch.cuda.max_memory_allocated(DEVICE) - self.base
        self.peak, self.peak_since_mark = max(self.peak, top), max(self.peak_since_mark, top)
        return False


def new_memory():
    return CudaMemory() if DEVICE.startswith("cuda") else TensorMemory()


class Probe:
    """Wraps F: notes when F is first called with grad enabled (the estimator starts)."""

    def __init__(self, func: Callable[[Tensor], Tensor], memory: Optional[TensorMemory] = None):
        self.func, self.memory = func, memory
        self.t_first_grad: Optional[float] = None
        self.c_first_grad: Optional[float] = None

    def __call__(self, h: Tensor) -> Tensor:
        if self.t_first_grad is None and torch.is_grad_enabled():
            _sync()
            self.t_first_grad, self.c_first_grad = time.perf_counter(), time.process_time()
            if self.memory is not None:
                self.memory.mark()
        return self.func(h)


# --------------------------------------------------------------------------- problem


# The vision issue's configurations: (preset, classes, defaults of the run's flags).
MDEQ_CONFIGS = {
    "tiny": ("tiny", 10, dict(batch=32, image_size=32, f_thres=22, b_thres=24, lam=0.5,
                              ks=[1, 2, 5, 10, 20])),
    "large_cifar": ("large_cifar", 10, dict(batch=32, image_size=32, f_thres=18, b_thres=20,
                                            lam=0.5, ks=[1, 5, 10])),
    "small_imagenet": ("small_imagenet", 1000, dict(batch=16, image_size=224, f_thres=26,
                                                    b_thres=27, lam=0.6, ks=[1, 5, 10])),
}


def build_model(kind: str, image_size: int, preset: str = "tiny"
                ) -> tuple[torch.nn.Module, str]:
    """MDEQ at ``preset`` (``pipeline.models.mdeq``) or, for tiny, the stand-in cell;
    returns (model, name)."""
    if kind in ("auto", "mdeq"):
        try:
            from pipeline.models.mdeq import MDEQ, MDEQConfig
            classes = MDEQ_CONFIGS[preset][1]
            model = MDEQ(MDEQConfig.from_params({"preset": preset}, in_channels=3,
                                                num_classes=classes, image_size=image_size))
            return model.train(), "mdeq" if preset == "tiny" else f"mdeq_{preset}"
        except ImportError:
            if kind == "mdeq" or preset != "tiny":
                raise
    from benchmarks.conv_cell import ConvCellConfig, ConvDEQCell
    return ConvDEQCell(ConvCellConfig(image_size=image_size)).train(), "conv_cell"


@dataclass(frozen=True)
class Case:
    impl: str          # "ours" or "torchdeq"
    estimator: str     # implicit, upg, npg, jfb
    k: Optional[int] = None
    lam: Optional[float] = None

    @property
    def key(self) -> tuple:
        return (self.impl, self.estimator, self.k, self.lam)


def make_cases(ks: list[int], lam: float) -> list[list[Case]]:
    """Groups of cases that are compared with each other, timed back to back."""
    groups = [[Case("ours", "implicit"), Case("torchdeq", "implicit")],
              [Case("ours", "jfb", 1, 1.0), Case("torchdeq", "jfb", 1, 1.0)]]
    groups += [[Case("ours", "upg", k, lam), Case("torchdeq", "upg", k, lam),
                Case("ours", "npg", k, lam)] for k in ks]
    return groups


def schedule(groups: list[list[Case]], repeat: int) -> list[Case]:
    """Order of one repeat: the groups rotate, and within a group the order reverses
    every other repeat, so neither the slow start of a repeat nor a slow spell of a
    shared machine falls on the same case every time."""
    shift = repeat % len(groups)
    order = groups[shift:] + groups[:shift]
    return [c for g in order for c in (g if repeat % 2 == 0 else g[::-1])]


_GIVEN_REGISTERED = False


def _register_given_solver() -> None:
    """A TorchDEQ solver that makes no step: z* is the z_init it is handed."""
    global _GIVEN_REGISTERED
    if _GIVEN_REGISTERED:
        return
    from torchdeq.solver import register_solver, solver_stat_from_final_step

    def given(func, x0, max_iter=0, tol=None, stop_mode=None, indexing=None, **_):
        with torch.no_grad():
            info = solver_stat_from_final_step(x0, func(x0))
        return x0, [x0], info

    register_solver("given", given)
    _GIVEN_REGISTERED = True


class Bench:
    """One benchmark configuration: the model, the input, the solver budgets."""

    def __init__(self, args):
        self.args = args
        torch.manual_seed(args.seed)
        self.model, self.model_name = build_model(args.model, args.image_size, args.config)
        self.model.to(args.device)
        self.x = torch.randn(args.batch, 3, args.image_size, args.image_size).to(args.device)
        func, h0 = self.problem()
        self.state_size = h0.shape[1]
        self.y = torch.randn(h0.shape, generator=torch.Generator().manual_seed(args.seed + 1)
                             ).to(args.device)
        self.f_solver = SolverConfig("broyden", args.f_thres, args.f_tol, "rel",
                                     check_every=args.check_every, graph=args.graph)
        _register_given_solver()

    def problem(self):
        """(func, h0) with the stem's graph; the same F (and dropout masks) every call."""
        torch.manual_seed(self.args.seed)
        return self.model.deq_problem(self.x)

    def warmup(self) -> None:
        """Untimed: first calls pay one-off costs (kernel selection, allocator growth)."""
        func, h0 = self.problem()
        with torch.no_grad():
            z, _ = solve(func, h0, replace(self.f_solver, max_iter=min(3, self.f_solver.max_iter)))
        for case in (Case("ours", "jfb", 1, 1.0), Case("ours", "npg", 1, 0.5),
                     Case("ours", "implicit"), Case("torchdeq", "jfb", 1, 1.0),
                     Case("torchdeq", "implicit")):
            self.grad_step(case, z)

    def loss(self, h: Tensor) -> Tensor:
        return 0.5 * ((h - self.y) ** 2).sum() / h.shape[0]

    # forward solves ------------------------------------------------------------------

    def solve_ours(self, memory: Optional[TensorMemory] = None):
        func, h0 = self.problem()
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), (memory or _null()):
            z, stats = solve(func, h0, self.f_solver)
        _sync()
        return z, stats, (time.perf_counter() - t0, time.process_time() - c0)

    def solve_torchdeq(self, memory: Optional[TensorMemory] = None):
        from torchdeq import get_deq
        func, h0 = self.problem()
        deq = get_deq(core="indexing", f_solver="broyden", f_max_iter=self.args.f_thres,
                      f_tol=self.args.f_tol, f_stop_mode="rel").eval()
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), (memory or _null()):
            z_out, info = deq(func, h0)
        _sync()
        return z_out[-1], info, (time.perf_counter() - t0, time.process_time() - c0)

    # gradient steps ------------------------------------------------------------------

    def grad_step(self, case: Case, z_star: Tensor, memory: Optional[TensorMemory] = None):
        """The estimator's forward part and backward from z*; returns timings and stats."""
        self.model.zero_grad(set_to_none=True)
        func, _ = self.problem()
        probe = Probe(func, memory)
        bwd_stats: list = []
        with memory or _null():
            if case.impl == "ours":
                h = attach_estimator(probe, z_star.clone(), self.estimator(case), bwd_stats)
            else:
                deq = self.torchdeq_layer(case).train()
                z_out, _ = deq(probe, z_star.clone(), backward_writer=bwd_stats.append)
                h = z_out[-1]
            _sync()
            t1, c1 = time.perf_counter(), time.process_time()
            loss = self.loss(h)
            _sync()
            t2, c2 = time.perf_counter(), time.process_time()
            loss.backward()
            _sync()
            t3, c3 = time.perf_counter(), time.process_time()
        del h, loss
        # Steps of our backward solve (TorchDEQ's stats pad their trace to b_thres and
        # do not say how many steps ran; with an unreachable tolerance it is b_thres).
        bwd_nstep = bwd_stats[0].nstep if case.impl == "ours" and bwd_stats else None
        return dict(est_forward_s=t1 - probe.t_first_grad, backward_s=t3 - t2,
                    est_forward_cpu_s=c1 - probe.c_first_grad, backward_cpu_s=c3 - c2,
                    bwd_nstep=bwd_nstep)

    def estimator(self, case: Case) -> EstimatorConfig:
        a = self.args
        if case.estimator == "implicit":
            return EstimatorConfig("implicit", b_solver="broyden", b_max_iter=a.b_thres,
                                   b_tol=a.b_tol, b_stop_mode="rel",
                                   b_check_every=a.check_every)
        if case.estimator == "jfb":
            return EstimatorConfig("jfb")
        return EstimatorConfig(case.estimator, k=case.k, lam=case.lam)

    def torchdeq_layer(self, case: Case):
        from torchdeq import get_deq
        common = dict(core="indexing", f_solver="given", f_max_iter=0)
        if case.estimator == "implicit":
            return get_deq(ift=True, b_solver="broyden", b_max_iter=self.args.b_thres,
                           b_tol=self.args.b_tol, b_stop_mode="rel", **common)
        if case.estimator == "jfb":
            return get_deq(grad=1, tau=1.0, **common)
        if case.estimator == "upg":
            return get_deq(grad=case.k, tau=case.lam, **common)
        raise ValueError(f"TorchDEQ has no {case.estimator!r}")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- run


def run(args) -> list[dict]:
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    groups = make_cases(args.ks, args.lam)
    cases = [c for g in groups for c in g]
    info = machine(DEVICE)
    log = print if not args.silent else (lambda *a, **k: None)
    log(f"model {bench.model_name}, batch {args.batch}, n = {bench.state_size}, "
        f"{info['cpu']} ({info['cores']} cores, {info['threads']} threads), torch {info['torch']}")

    bench.warmup()
    times: dict[tuple, list[dict]] = {c.key: [] for c in cases}
    solve_t: dict[str, list[tuple[float, float]]] = {"ours": [], "torchdeq": []}
    fwd_stats = {}
    loads = [load_average()]
    for r in range(args.repeats):
        if r % 2:  # alternate which solver goes first
            _, tinfo, t_theirs = bench.solve_torchdeq()
        z_star, stats, t = bench.solve_ours()
        solve_t["ours"].append(t)
        fwd_stats["ours"] = (stats.nstep, stats.rel_residual)
        if not r % 2:
            _, tinfo, t_theirs = bench.solve_torchdeq()
        solve_t["torchdeq"].append(t_theirs)
        fwd_stats["torchdeq"] = (bench.args.f_thres, float(tinfo["rel_lowest"].max()))
        log(f"repeat {r + 1}/{args.repeats}: solve ours {solve_t['ours'][-1][0]:.2f}s, "
            f"torchdeq {solve_t['torchdeq'][-1][0]:.2f}s (rel residual {stats.rel_residual:.2e})")
        for case in schedule(groups, r):
            res = bench.grad_step(case, z_star)
            times[case.key].append(res)
            log(f"  {case.impl:8s} {case.estimator:8s} k={case.k} lam={case.lam}: "
                f"est fwd {res['est_forward_s']:.3f}s bwd {res['backward_s']:.3f}s "
                f"(cpu {res['est_forward_cpu_s']:.3f}s + {res['backward_cpu_s']:.3f}s)")
        loads.append(load_average())

    # Memory: a separate pass, one step per case.
    z_star, _, _ = bench.solve_ours()
    solve_mem = {}
    for impl, fn in (("ours", bench.solve_ours), ("torchdeq", bench.solve_torchdeq)):
        mem = new_memory()
        fn(mem)
        solve_mem[impl] = mem.peak / 2 ** 20
    peak = {}
    for case in cases:
        mem = new_memory()
        bench.grad_step(case, z_star, mem)
        peak[case.key] = mem.peak_since_mark / 2 ** 20
        log(f"  memory {case.impl:8s} {case.estimator:8s} k={case.k}: {peak[case.key]:.1f} MiB")
    loads.append(load_average())

    med = statistics.median
    load = med([v for v in loads if not math.isnan(v)] or [math.nan])
    rows = []
    for case in cases:
        ts = times[case.key]
        row = dict(
            estimator=case.estimator, k=case.k if case.k is not None else "",
            lam=case.lam if case.lam is not None else "", impl=case.impl,
            model=bench.model_name, batch=args.batch, state_size=bench.state_size,
            f_thres=args.f_thres, b_thres=args.b_thres if case.estimator == "implicit" else "",
            repeats=args.repeats, peak_mem_mb=peak[case.key], solve_mem_mb=solve_mem[case.impl],
            fwd_nstep=fwd_stats[case.impl][0], fwd_rel_residual=fwd_stats[case.impl][1],
            bwd_nstep=ts[-1]["bwd_nstep"] if ts[-1]["bwd_nstep"] is not None else "",
            load_avg=load, config=args.config,
            check_every=args.check_every if case.impl == "ours" else "",
            graph=args.graph if case.impl == "ours" else "", **info)
        for i, clock in enumerate(("", "_cpu")):  # wall clock, then CPU time
            solves = [t[i] for t in solve_t[case.impl]]
            grads = [t[f"est_forward{clock}_s"] + t[f"backward{clock}_s"] for t in ts]
            row.update({f"forward{clock}_s": med(solves),
                        f"est_forward{clock}_s": med(t[f"est_forward{clock}_s"] for t in ts),
                        f"backward{clock}_s": med(t[f"backward{clock}_s"] for t in ts),
                        f"grad{clock}_s": med(grads), f"step{clock}_s": med(solves) + med(grads),
                        f"forward{clock}_min_s": min(solves), f"grad{clock}_min_s": min(grads)})
        rows.append(row)
    by_key = {(r["impl"], r["estimator"], r["k"] or None, r["lam"] or None): r for r in rows}
    for r in rows:
        imp = by_key[(r["impl"], "implicit", None, None)]
        other = by_key.get(("torchdeq", r["estimator"], r["k"] or None, r["lam"] or None))
        for sfx, out in (("_s", ""), ("_cpu_s", "_cpu")):
            r["grad_speedup_vs_implicit" + out] = imp["grad" + sfx] / r["grad" + sfx]
            if r["impl"] == "ours" and other is not None:
                r["grad_ratio_ours_over_torchdeq" + out] = r["grad" + sfx] / other["grad" + sfx]
                r["step_ratio_ours_over_torchdeq" + out] = r["step" + sfx] / other["step" + sfx]
            else:
                r["grad_ratio_ours_over_torchdeq" + out] = ""
                r["step_ratio_ours_over_torchdeq" + out] = ""
    return rows


def plot(rows: list[dict], stem: Path) -> list[Path]:
    """Gradient time (wall and CPU) and peak memory against k, one line per estimator."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    styles = {("ours", "upg"): ("C0", "o", "-"), ("ours", "npg"): ("C1", "s", "-"),
              ("torchdeq", "upg"): ("C2", "x", ":")}
    flat = {("ours", "implicit"): ("C3", "--"), ("torchdeq", "implicit"): ("C4", ":")}
    panels = ((axes[0], "grad_s", "wall time: estimator forward + backward (s)"),
              (axes[1], "grad_cpu_s", "CPU time (all threads): same (s)"),
              (axes[2], "peak_mem_mb", "peak tensor memory of the gradient (MiB)"))
    ks = sorted({r["k"] for r in rows if isinstance(r["k"], int) and r["estimator"] != "jfb"})
    for ax, col, ylabel in panels:
        for (impl, est), (color, marker, ls) in styles.items():
            sel = sorted((r for r in rows if r["impl"] == impl and r["estimator"] == est),
                         key=lambda r: r["k"])
            if sel:
                ax.plot([r["k"] for r in sel], [r[col] for r in sel], color=color, marker=marker,
                        ls=ls, label=f"{est.upper()} A_(k,{sel[0]['lam']}) ({impl})")
        for (impl, est), (color, ls) in flat.items():
            for r in rows:
                if r["impl"] == impl and r["estimator"] == est:
                    ax.axhline(r[col], color=color, ls=ls,
                               label=f"implicit, Broyden b_thres {r['b_thres']} ({impl})")
        for r in rows:
            if r["estimator"] == "jfb" and r["impl"] == "ours":
                ax.plot([1], [r[col]], "k^", label="JFB (ours)")
        ax.set_xlabel("k (unrolled steps / Neumann terms)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="upper left")
    r0 = rows[0]
    fig.suptitle(f"Gradient of a {r0['model']} DEQ (n = {r0['state_size']} per sample), batch "
                 f"{r0['batch']}, float32; forward Broyden f_thres {r0['f_thres']} "
                 f"(ours {r0['forward_s']:.1f} s wall)")
    fig.text(0.5, 0.01, f"device {device_text(r0)}; "
             f"{r0['cpu']}, {r0['cores']} cores ({r0['threads']} torch threads), "
             f"torch {r0['torch']}, torchdeq {r0['torchdeq']}; median of {r0['repeats']} "
             f"repeats; load average {r0['load_avg']:.1f} during the run; "
             f"{_dt.date.today().isoformat()}", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return save_figure(fig, stem)


def _best_step(r: dict) -> float:
    return r["forward_min_s"] + r["grad_min_s"]


def summary(rows: list[dict]) -> str:
    """The three targets of the issue, as measured (reported, never asserted)."""
    get = {(r["impl"], r["estimator"], r["k"] if r["k"] != "" else None): r for r in rows}
    lines = []
    imp = get.get(("ours", "implicit", None))
    upg5 = get.get(("ours", "upg", 5))
    if imp and upg5:
        lines.append(
            f"UPG A_(5,{upg5['lam']}) vs implicit (b_thres {imp['b_thres']}), target >= 2x: "
            f"gradient {imp['grad_s'] / upg5['grad_s']:.2f}x faster (median wall), "
            f"{imp['grad_min_s'] / upg5['grad_min_s']:.2f}x (best wall), "
            f"{imp['grad_cpu_s'] / upg5['grad_cpu_s']:.2f}x (median CPU); backward() alone "
            f"{imp['backward_s'] / upg5['backward_s']:.2f}x (median wall)")
    npg5 = get.get(("ours", "npg", 5))
    if imp and upg5 and npg5:  # the vision issue's ratios, at the configuration's shape
        lines.append(
            f"implicit / UPG A_5: gradient {imp['grad_s'] / upg5['grad_s']:.2f}x, step "
            f"{imp['step_s'] / upg5['step_s']:.2f}x; implicit / NPG A_5: gradient "
            f"{imp['grad_s'] / npg5['grad_s']:.2f}x, step {imp['step_s'] / npg5['step_s']:.2f}x "
            f"(median wall)")
        lines.append(
            f"peak memory of the gradient: UPG A_5 / implicit "
            f"{upg5['peak_mem_mb'] / imp['peak_mem_mb']:.2f}, NPG A_5 / implicit "
            f"{npg5['peak_mem_mb'] / imp['peak_mem_mb']:.2f}")
    ks = sorted(r["k"] for r in rows if r["impl"] == "ours" and r["estimator"] == "npg")
    if len(ks) >= 2:
        for est in ("npg", "upg"):
            lo, hi = get[("ours", est, ks[0])], get[("ours", est, ks[-1])]
            lines.append(f"{est.upper()} peak memory k={ks[0]} -> {ks[-1]}: "
                         f"{lo['peak_mem_mb']:.1f} -> {hi['peak_mem_mb']:.1f} MiB "
                         f"({hi['peak_mem_mb'] / lo['peak_mem_mb'] - 1:+.1%}; "
                         f"k={ks[-1]} / k={ks[0]}: {hi['peak_mem_mb'] / lo['peak_mem_mb']:.2f})")
    for r in rows:
        if r["impl"] == "ours" and r["grad_ratio_ours_over_torchdeq"] != "":
            t = get[("torchdeq", r["estimator"], r["k"] if r["k"] != "" else None)]
            lines.append(f"ours/torchdeq {r['estimator']} k={r['k'] or '-'} (target <= 1): "
                         f"gradient {r['grad_ratio_ours_over_torchdeq']:.2f} median wall, "
                         f"{r['grad_min_s'] / t['grad_min_s']:.2f} best wall, "
                         f"{r['grad_ratio_ours_over_torchdeq_cpu']:.2f} median CPU; whole step "
                         f"{r['step_ratio_ours_over_torchdeq']:.2f} median wall, "
                         f"{_best_step(r) / _best_step(t):.2f} best wall")
    fw = {r["impl"]: r for r in rows}
    if "torchdeq" in fw:
        o, t = fw["ours"], fw["torchdeq"]
        lines.append(f"forward solve ours/torchdeq: {o['forward_s'] / t['forward_s']:.2f} median "
                     f"wall ({o['forward_s']:.2f}s vs {t['forward_s']:.2f}s), "
                     f"{o['forward_min_s'] / t['forward_min_s']:.2f} best wall, "
                     f"{o['forward_cpu_s'] / t['forward_cpu_s']:.2f} median CPU; solve memory "
                     f"{o['solve_mem_mb']:.0f} vs {t['solve_mem_mb']:.0f} MiB")
    lines.append(f"load average during the run: {rows[0]['load_avg']:.1f} "
                 f"on {rows[0]['cores']} cores; device {device_text(rows[0])}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 4, 8x8 images, f/b_thres 3, k in {1, 2}, 1 repeat")
    p.add_argument("--batch", type=int, default=None, help="batch size (32)")
    p.add_argument("--image-size", type=int, default=None, help="input size; 32 for CIFAR")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (5)")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help="k values for UPG / NPG (1 2 5 10 20); include 5 for the A_{5,0.5} target")
    p.add_argument("--lam", type=float, default=None, help="damping lambda (0.5; small_imagenet 0.6)")
    p.add_argument("--f-thres", type=int, default=None, help="forward Broyden steps (22)")
    p.add_argument("--b-thres", type=int, default=None, help="backward Broyden steps (24)")
    p.add_argument("--f-tol", type=float, default=1e-9,
                   help="forward rel. tolerance; below float32's reach so f_thres steps run")
    p.add_argument("--b-tol", type=float, default=1e-9, help="backward rel. tolerance")
    p.add_argument("--check-every", type=int, default=1,
                   help="our solves read their residual on the host every N steps (1); 0: "
                        "once, at the end (a fixed budget: pipeline/deq/solvers.py)")
    p.add_argument("--graph", action="store_true",
                   help="our forward solve replays F from a CUDA graph (on a GPU)")
    p.add_argument("--model", choices=["auto", "mdeq", "conv_cell"], default="auto",
                   help="pipeline.models.mdeq if importable (auto), or benchmarks/conv_cell.py")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-csv", type=Path, default=Path("results/benchmarks/backward.csv"))
    p.add_argument("--out-fig", type=Path, default=Path("figures/benchmarks/backward"),
                   help="figure path without extension; .png and .pdf are written")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--silent", action="store_true")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="skip benchmarks/diagnostics.py (diagnostics cost, reference quality)")
    p.add_argument("--config", choices=sorted(MDEQ_CONFIGS), default="tiny",
                   help="MDEQ-Tiny (tiny), MDEQ large on CIFAR-10 (large_cifar) or MDEQ-Small "
                        "on ImageNet (small_imagenet), at their real shapes and budgets")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--no-ddp", action="store_true",
                   help="skip benchmarks/ddp.py (DDP step time, 2 gloo CPU ranks / 1)")
    argv = sys.argv[1:] if argv is None else argv
    diagnostics.add_arguments(p, quick="--quick" in argv)
    ddp.add_arguments(p, quick="--quick" in argv)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible")
    full = dict(repeats=5, **MDEQ_CONFIGS[args.config][2])
    quick = dict(batch=4, image_size=8, repeats=1, ks=[1, 2], f_thres=3, b_thres=3, lam=0.5)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# The paper's backward-speed claim (abstract, "about 1.7x"), as pipeline/figures/
# reference.yaml states its rule: MDEQ large at CIFAR-10's shape (the large_cifar preset:
# 32x32, batch 32, forward and backward budgets 18 / 20, lambda 0.5) on a GPU, UPG A_{5,0.5}
# among the cases.
PAPER_SHAPE = dict(config="large_cifar", **{key: MDEQ_CONFIGS["large_cifar"][2][key] for key in
                                            ("image_size", "batch", "f_thres", "b_thres", "lam")})


def run_summary(args, rows: list[dict]) -> dict:
    """What the report needs beside backward.csv (summary.json): the scale ("paper" when the
    shape, budgets and device are the paper's claim's, PAPER_SHAPE on CUDA with k = 5 among
    the cases; "default" otherwise), the dataset shape, the budgets and how they stop, the
    machine and the commit."""
    from pipeline.tracking import git_commit
    paper = (all(getattr(args, key) == value for key, value in PAPER_SHAPE.items())
             and 5 in args.ks and args.device.startswith("cuda"))
    dataset = "cifar10-shape" if (args.config, args.image_size) == ("large_cifar", 32) \
        else f"{args.config}-{args.image_size}px"
    return dict(scale="paper" if paper else "default", dataset=dataset, config=args.config,
                batch=args.batch, image_size=args.image_size, f_thres=args.f_thres,
                b_thres=args.b_thres, f_tol=args.f_tol, b_tol=args.b_tol, lam=args.lam,
                ks=list(args.ks), repeats=args.repeats, check_every=args.check_every,
                graph=args.graph, machine={k: rows[0].get(k) for k in
                                           ("cpu", "cores", "threads", "torch", "torchdeq",
                                            "device", "gpu")} if rows else {},
                git_commit=git_commit())


def _config(argv) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _config(argv) not in (None, *MDEQ_CONFIGS):  # IGNN's (benchmarks/ignn.py)
        return _ignn(argv)
    args = parse_args(argv)
    rows = run(args)
    write_csv(rows, args.out_csv, COLUMNS)
    write_json(run_summary(args, rows), args.out_csv.parent / "summary.json")
    if not args.no_figure:
        for path in plot(rows, args.out_fig):
            print(f"wrote {path}")
    print(f"wrote {args.out_csv}")
    print(summary(rows))
    if not args.no_diagnostics:
        log = print if not args.silent else (lambda *a, **k: None)
        diag = diagnostics.from_backward_args(args)
        write_csv(diagnostics.run(diag, log), diag.csv, diagnostics.COLUMNS)
        print(f"wrote {diag.csv}")
    if not args.no_ddp:
        ddp_args = argparse.Namespace(config=args.config, steps=args.ddp_steps,
                                      warmup=args.ddp_warmup, batch=args.ddp_batch or args.batch,
                                      image_size=args.image_size)
        write_csv([ddp.run(ddp_args)], args.ddp_csv, ddp.COLUMNS)
        print(f"wrote {args.ddp_csv}")
    return rows


def _ignn(argv) -> list[dict]:
    """``--config ignn_graph|ignn_ppi|deq_transformer``: IGNN's layers (benchmarks/ignn.py)
    or the DEQ-Transformer (benchmarks/deq_transformer.py) instead of MDEQ-Tiny's."""
    from benchmarks import deq_transformer, ignn
    modules = {**{name: ignn for name in ignn.CONFIGS}, "deq_transformer": deq_transformer}
    p = argparse.ArgumentParser(description="backward benchmark of another implicit model")
    p.add_argument("--config", required=True, choices=sorted(modules))
    p.add_argument("--quick", action="store_true", help="smoke run: a small shape")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (5)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-csv", type=Path, default=Path("results/benchmarks/backward.csv"),
                   help="default: results/benchmarks/<config>.csv")
    known, _ = p.parse_known_args(argv)
    module = modules[known.config]
    module.add_arguments(p)
    return module.main(p.parse_args(argv))


if __name__ == "__main__":
    main()
