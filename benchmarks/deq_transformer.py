"""DEQ-Transformer backward benchmark: implicit differentiation + JR against UPG + JR and NPG.

    .venv/bin/python -m benchmarks.backward --config deq_transformer            # CPU, default shape
    .venv/bin/python -m benchmarks.backward --config deq_transformer --quick    # smoke run
    .venv/bin/python -m benchmarks.backward --config deq_transformer --shape paper --device cuda

Shapes, on random token ids (no corpus needed):

* ``default`` (the lm study's default scale): d_model 64, 2 heads of 32, d_inner 256,
  vocabulary 14,185 with cutoffs [2000, 6000], batch 8, segment 32, memory 32.
* ``paper`` (CUDA only): the 98M model, vocabulary 267,735, batch 14 (one GPU's share of
  the official 56 on 4), segment 150, memory 150.

The memory is the one a first no-grad segment leaves. Per case, one training step (the
forward solve with Broyden at ``f_thres``, the estimator's graph, the JR penalty when on,
``loss.backward()``) is timed ``--repeats`` times with the cases rotating order; the
medians are reported: ``forward_s`` (solve, head and JR penalty), ``backward_s`` and
``step_s``. The JR penalty is applied on every timed step (the cost of a step that draws
it; a run pays it on ``freq`` of its steps). Peak tensor memory of one step has its own
pass (``pipeline.memory.peak_memory``: the CPU's tensor counter, CUDA's allocator).

Cases (PostLN): ``implicit_jr`` (implicit differentiation, Broyden 14/14, JR 2.0: the
official PreLN + JR budget), ``implicit`` (the same, JR off), ``upg_jr_f14`` and
``upg_jr_f20`` (UPG A_{5,0.5} + JR 0.1 at f_thres 14 and 20), ``upg_f14`` (JR off), ``npg``
(NPG A_{5,0.5}, f_thres 14, no JR). Reported: step and backward time of implicit + JR over
each of UPG + JR f14, f20 and NPG; peak memory JR on / off (implicit, UPG) and UPG / implicit.
At random initialisation; a trained model's backward systems are harder, so implicit's
backward (a Broyden solve to b_thres) costs at least this much there.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import write_csv
from pipeline.deq import EstimatorConfig, SolverConfig, jacobian_penalty, record_layers
from pipeline.memory import peak_memory
from pipeline.models.deq_transformer import DEQTransformer, DEQTransformerConfig

SHAPES = {
    "default": dict(model={"preset": "default"}, n_token=14_185, batch=8),
    "paper": dict(model={"preset": "paper"}, n_token=267_735, batch=14),
}
QUICK = dict(model={"preset": "default", "d_model": 16, "n_head": 2, "d_head": 8,
                    "d_inner": 32, "tgt_len": 8, "mem_len": 8}, n_token=8_000, batch=2)
COLUMNS = ["case", "estimator", "k", "lam", "f_thres", "b_thres", "jr_weight", "shape",
           "batch", "tgt_len", "mem_len", "params", "repeats", "forward_s", "backward_s",
           "step_s", "fwd_nstep", "peak_mem_mb", "step_ratio_implicit_jr_over_this",
           "backward_ratio_implicit_jr_over_this", "step_ratio_implicit_f30_over_this",
           "device", "threads", "torch"]


@dataclass(frozen=True)
class Case:
    name: str
    estimator: EstimatorConfig
    f_thres: int
    jr_weight: float


CASES = [
    Case("implicit_jr", EstimatorConfig("implicit", b_max_iter=14, b_tol=1e-3), 14, 2.0),
    Case("implicit", EstimatorConfig("implicit", b_max_iter=14, b_tol=1e-3), 14, 0.0),
    Case("upg_jr_f14", EstimatorConfig("upg", k=5, lam=0.5), 14, 0.1),
    Case("upg_jr_f20", EstimatorConfig("upg", k=5, lam=0.5), 20, 0.1),
    Case("upg_f14", EstimatorConfig("upg", k=5, lam=0.5), 14, 0.0),
    Case("npg", EstimatorConfig("npg", k=5, lam=0.5), 14, 0.0),
    # the DEQ protocol's baseline: implicit without JR at the official PostLN script's 30/35
    Case("implicit_f30", EstimatorConfig("implicit", b_max_iter=35, b_tol=1e-3), 30, 0.0),
]


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Bench:
    def __init__(self, args):
        spec = QUICK if args.quick else SHAPES[args.shape]
        if args.shape == "paper" and not args.device.startswith("cuda"):
            raise SystemExit("--shape paper is the 98M model: run it with --device cuda")
        self.device, self.spec = args.device, spec
        torch.manual_seed(args.seed)
        cfg = DEQTransformerConfig.from_params(spec["model"], n_token=spec["n_token"])
        self.cfg = cfg
        self.model = DEQTransformer(cfg).to(args.device).train()
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, spec["n_token"], (spec["batch"], 2 * cfg.tgt_len + 1), generator=gen)
        ids = ids.to(args.device)
        self.x, self.y = ids[:, cfg.tgt_len:-1], ids[:, cfg.tgt_len + 1:]
        with torch.no_grad():   # the memory a first segment leaves
            self.memory = self.model(ids[:, :cfg.tgt_len], ids[:, 1:cfg.tgt_len + 1],
                                     self.model.init_memory(spec["batch"]),
                                     SolverConfig("broyden", 14, 1e-3), CASES[2].estimator).memory

    def step(self, case: Case) -> dict:
        """One training step of ``case`` (gradients cleared after)."""
        torch.manual_seed(1)       # the same dropout masks for every case
        t0 = _now(self.device)
        with record_layers() as layers:
            out = self.model(self.x, self.y, self.memory,
                             SolverConfig("broyden", case.f_thres, 1e-3), case.estimator)
        loss = out.nll.mean()
        if case.jr_weight:
            loss = loss + case.jr_weight * jacobian_penalty(layers, 1,
                                                            torch.Generator().manual_seed(0))
        t1 = _now(self.device)
        loss.backward()
        t2 = _now(self.device)
        self.model.zero_grad(set_to_none=True)
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t2 - t0,
                "fwd_nstep": out.stats.nstep}


def run(args) -> list[dict]:
    bench = Bench(args)
    for case in CASES:                       # warm-up
        bench.step(case)
    times = {c.name: [] for c in CASES}
    for rep in range(args.repeats):
        order = CASES[rep % len(CASES):] + CASES[:rep % len(CASES)]
        for case in (order if rep % 2 == 0 else order[::-1]):
            times[case.name].append(bench.step(case))
    rows = []
    for case in CASES:
        with peak_memory(args.device) as mem:
            bench.step(case)
        med = {k: statistics.median(t[k] for t in times[case.name])
               for k in ("forward_s", "backward_s", "step_s")}
        rows.append({"case": case.name, "estimator": case.estimator.name,
                     "k": case.estimator.k if case.estimator.name != "implicit" else "",
                     "lam": case.estimator.lam if case.estimator.name != "implicit" else "",
                     "f_thres": case.f_thres,
                     "b_thres": case.estimator.b_max_iter if case.estimator.name == "implicit" else "",
                     "jr_weight": case.jr_weight, "shape": "quick" if args.quick else args.shape,
                     "batch": bench.spec["batch"], "tgt_len": bench.cfg.tgt_len,
                     "mem_len": bench.cfg.mem_len,
                     "params": sum(p.numel() for p in bench.model.parameters()),
                     "repeats": args.repeats, **med,
                     "fwd_nstep": times[case.name][-1]["fwd_nstep"], "peak_mem_mb": mem.peak_mb,
                     "device": args.device, "threads": torch.get_num_threads(),
                     "torch": torch.__version__})
    ref = next(r for r in rows if r["case"] == "implicit_jr")
    base = next(r for r in rows if r["case"] == "implicit_f30")
    for r in rows:
        r["step_ratio_implicit_jr_over_this"] = ref["step_s"] / r["step_s"]
        r["backward_ratio_implicit_jr_over_this"] = ref["backward_s"] / r["backward_s"]
        r["step_ratio_implicit_f30_over_this"] = base["step_s"] / r["step_s"]
    return rows


def summary(rows: list[dict]) -> str:
    by = {r["case"]: r for r in rows}
    lines = [f"DEQ-Transformer ({rows[0]['shape']}, batch {rows[0]['batch']}, "
             f"{rows[0]['params']:,} parameters, {rows[0]['device']}):"]
    for name in ("upg_jr_f14", "upg_jr_f20", "npg"):
        r = by[name]
        lines.append(f"  implicit + JR 2.0 / {name}: step {r['step_ratio_implicit_jr_over_this']:.2f}x, "
                     f"backward {r['backward_ratio_implicit_jr_over_this']:.2f}x; implicit "
                     f"30/35 (no JR) / {name}: step {r['step_ratio_implicit_f30_over_this']:.2f}x")
    lines.append(f"  peak memory JR on / off: implicit "
                 f"{by['implicit_jr']['peak_mem_mb'] / by['implicit']['peak_mem_mb']:.2f}x, "
                 f"UPG {by['upg_jr_f14']['peak_mem_mb'] / by['upg_f14']['peak_mem_mb']:.2f}x "
                 "(the JR paper: +25-30%)")
    lines.append(f"  peak memory UPG / implicit (JR off): "
                 f"{by['upg_f14']['peak_mem_mb'] / by['implicit']['peak_mem_mb']:.2f}x")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="default")
    p.add_argument("--device", default="cpu")


def main(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    rows = run(args)
    out = args.out_csv if args.out_csv != Path("results/benchmarks/backward.csv") \
        else Path("results/benchmarks/deq_transformer.csv")
    write_csv(rows, out, COLUMNS)
    print(f"wrote {out}")
    print(summary(rows))
    return rows
