"""GPU measurements of the forward solve, the training step and a CUDA resume.

Run through ``benchmarks/gpu.sh`` (every GPU number of ``benchmarks/README.md``), or alone:

    python -m benchmarks.gpu_check solve-profile --out OUT [--quick]
    python -m benchmarks.gpu_check train-step --out OUT [--quick]
    python -m benchmarks.gpu_check resume --out OUT [--quick]

``--quick`` is the CPU rehearsal: tiny shapes, few repeats, on the CPU where no GPU is
visible; the CUDA-only parts (graphs, the sync debug mode, the kernel profile) then say
"n/a". Every step writes a CSV or JSON into ``--out`` and prints one summary line per row.

* ``solve-profile``: MDEQ (large) at CIFAR's shape, batch 32 and 128, Broyden with 18
  steps and its tolerance out of reach. One call of F eagerly (weight norm computed in the
  call, as PyTorch's parametrization does), eagerly with the weight norm cached (as every
  solve now runs F), and replayed from a CUDA graph; kernels per F call from the second
  call on. Our solve with the residual read every step (``check_every=1``), never
  (``0``, one read at the end), and never with F from a CUDA graph; TorchDEQ's Broyden
  solve at the same shape. Per solve: wall time (median of repeats after a warm-up), host
  syncs (CUDA's sync debug mode, in warn mode, counting its warnings), kernels launched and
  their summed device time (``torch.profiler``, one solve).
* ``train-step``: the shared loop's ``train_step`` on MDEQ (large), batch 128, random
  32x32 images and labels, SGD, no pretraining, fixed budgets (18 forward, 20 backward
  steps, tolerances out of reach), implicit differentiation and UPG A_{5,0.5}: the
  settings before this work (residual read every step, F eager) and after (read once, F
  from a CUDA graph), each with deterministic algorithms on and off; median forward,
  backward and step time over the timed steps after a warm-up.
* ``resume``: the training loop on the device (MDEQ-Tiny's shape, random data), killed
  with SIGKILL after its step-4 checkpoint and resumed, against an uninterrupted run:
  the final weights and every step's loss must be bitwise equal.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts

import torch  # noqa: E402

from benchmarks.common import write_csv  # noqa: E402
from benchmarks.ddp import RandomImages  # noqa: E402  (the loop step on random images)


def _device(args) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _count_syncs(fn, device: str):
    """Host syncs of one call under CUDA's sync debug mode (warn), or None on the CPU."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def _kernels(fn, device: str):
    """(kernels launched, their summed device time in ms) of one call, or (None, None)."""
    if not device.startswith("cuda"):
        return None, None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    count, total_us = 0, 0.0
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            count += 1
            total_us += event.time_range.elapsed_us()
    return count, total_us / 1000


def _mdeq(preset: str, size: int, batch: int, device: str, seed: int = 0):
    from pipeline.models.mdeq import MDEQ, MDEQConfig
    torch.manual_seed(seed)
    config = MDEQConfig.from_params({"preset": preset}, in_channels=3, num_classes=10,
                                    image_size=size)
    model = MDEQ(config).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    return model, x


# --- solve-profile --------------------------------------------------------------------------

def solve_profile(args) -> list[dict]:
    from torch.nn.utils import parametrize

    from pipeline.deq import SolverConfig, solve
    from pipeline.deq.solvers import cuda_graphed
    device = _device(args)
    preset, size, batches, repeats = (("tiny", 8, [2], 2) if args.quick
                                      else ("large_cifar", 32, [32, 128], 10))
    steps = 18
    rows = []
    for batch in batches:
        model, x = _mdeq(preset, size, batch, device)
        model.eval()
        with torch.no_grad():
            func, h0 = model.deq_problem(x)
            h = func(h0)  # a state of the right size and scale

            def cached_call():
                with parametrize.cached():
                    func(h)

            graphed = cuda_graphed(func, h)
            calls = {"F eager (weight norm each call)": lambda: func(h),
                     "F eager, weight norm cached": cached_call,
                     "F from a CUDA graph": (lambda: graphed(h)) if graphed is not func else None}
            for name, call in calls.items():
                row = {"part": "F call", "case": name, "batch": batch, "device": device}
                if call is None:
                    row.update(note="n/a: no CUDA graph on this device")
                else:
                    row["wall_ms"] = _median_ms(call, device, 5 * repeats)
                    if name.startswith("F eager, weight norm cached"):
                        def second_calls():  # the cache holds from the second call on
                            with parametrize.cached():
                                func(h)
                                row["kernels"], row["kernel_ms"] = _kernels(lambda: func(h),
                                                                            device)
                        second_calls()
                    else:
                        row["kernels"], row["kernel_ms"] = _kernels(call, device)
                rows.append(row)
            cases = {"ours, residual read every step": SolverConfig("broyden", steps, 1e-12),
                     "ours, read once (fixed budget)": SolverConfig("broyden", steps, 1e-12,
                                                                    check_every=0),
                     "ours, read once, F from a CUDA graph": SolverConfig(
                         "broyden", steps, 1e-12, check_every=0, graph=True)}
            for name, cfg in cases.items():
                row = {"part": "solve", "case": name, "batch": batch, "device": device,
                       "steps": steps}
                row["wall_ms"] = _median_ms(lambda: solve(func, h0, cfg), device, repeats)
                row["syncs"] = _count_syncs(lambda: solve(func, h0, cfg), device)
                row["kernels"], row["kernel_ms"] = _kernels(lambda: solve(func, h0, cfg), device)
                rows.append(row)
            rows.append(_torchdeq_row(func, h0, steps, batch, device, repeats))
    for row in rows:
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()), flush=True)
    return rows


def _torchdeq_row(func, h0, steps, batch, device, repeats) -> dict:
    row = {"part": "solve", "case": "TorchDEQ broyden", "batch": batch, "device": device,
           "steps": steps}
    try:
        from torchdeq import get_deq
    except ImportError:
        row["note"] = "n/a: torchdeq is not installed"
        return row
    deq = get_deq(core="indexing", f_solver="broyden", f_max_iter=steps, f_tol=1e-12,
                  f_stop_mode="rel").eval()
    row["wall_ms"] = _median_ms(lambda: deq(func, h0), device, repeats)
    row["syncs"] = _count_syncs(lambda: deq(func, h0), device)
    row["kernels"], row["kernel_ms"] = _kernels(lambda: deq(func, h0), device)
    return row


# --- train-step -----------------------------------------------------------------------------

def train_step_rows(args) -> list[dict]:
    from pipeline import tracking as M
    from pipeline.experiments import determinism
    from pipeline.experiments.optim import make_optimizer, make_scheduler
    from pipeline.experiments.step import train_step
    from pipeline.experiments.train_config import TrainConfig
    device = _device(args)
    preset, size, batch, warm, timed = (("tiny", 8, 4, 1, 2) if args.quick
                                        else ("large_cifar", 32, 128, 3, 20))
    variants = [("before: read every step, F eager", 1, False),
                ("after: read once, F from a CUDA graph", 0, True)]
    rows, task = [], RandomImages(None)
    for estimator in ("implicit", "upg"):
        for deterministic in (False, True):
            for name, check, graph in variants:
                cfg = TrainConfig.from_params({
                    "estimator": estimator, "k": 5, "lam": 0.5, "pretrain_steps": 0,
                    "f_max_iter": 18, "b_max_iter": 20, "f_tol": 1e-12, "b_tol": 1e-12,
                    "f_check_every": check, "b_check_every": check, "f_graph": graph,
                    "deterministic": deterministic, "optimizer": "sgd", "lr": 0.1,
                    "weight_decay": 1e-4, "diagnostics_every": 0, "memory_every": 0,
                    "diverge_loss_factor": None, "diverge_residual": 1e30,
                    "device": device})
                determinism.configure(deterministic)
                model, _ = _mdeq(preset, size, 1, device)
                model.train()
                opt = make_optimizer(cfg, model)
                sched = make_scheduler(cfg, opt, warm + timed)
                state = {"epoch": 0, "step": 0, "memory_epoch": -1, "curves": []}
                gen = torch.Generator(device=device).manual_seed(1)
                times = {k: [] for k in (M.TIME_FORWARD, M.TIME_BACKWARD, M.TIME_STEP)}
                for i in range(warm + timed):
                    xb = torch.randn(batch, 3, size, size, device=device, generator=gen)
                    yb = torch.randint(0, 10, (batch,), device=device, generator=gen)
                    out = train_step(cfg, task, model, opt, sched, (xb, yb), state,
                                     cfg.diagnostics_config)
                    state["step"] += 1
                    if i >= warm:
                        for k in times:
                            times[k].append(out[k])
                row = {"estimator": estimator, "case": name, "deterministic": deterministic,
                       "batch": batch, "device": device, "steps": timed,
                       **{k.split("/")[1]: statistics.median(v) for k, v in times.items()}}
                rows.append(row)
                print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in row.items()), flush=True)
    return rows


# --- resume ---------------------------------------------------------------------------------

class _RandomTask(RandomImages):
    """A complete task on seeded random images (MDEQ-Tiny's shape): batches per
    (epoch, step), an evaluation on a fixed random batch; the loss and the pretraining
    estimator are RandomImages'."""

    name = "random_images"
    primary_metric = "acc"
    higher_is_better = True
    eval_split = "test"
    dataset = "random"

    def __init__(self, device: str, size: int, batch: int, steps: int):
        from pipeline.models.mdeq import MDEQConfig
        self.device, self.size, self.batch, self.steps = device, size, batch, steps
        super().__init__(MDEQConfig.from_params({"preset": "tiny"}, in_channels=3,
                                                num_classes=10, image_size=size))

    def build_model(self):
        from pipeline.models.mdeq import MDEQ
        return MDEQ(self.model_config).to(self.device)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return self.steps

    def batches(self, split, epoch, rank=0, world_size=1):
        gen = torch.Generator().manual_seed(1000 * epoch + (7 if split == "test" else 0))
        for _ in range(self.steps if split == "train" else 1):
            x = torch.randn(self.batch, 3, self.size, self.size, generator=gen)
            y = torch.randint(0, 10, (self.batch,), generator=gen)
            yield x.to(self.device), y.to(self.device)

    @torch.no_grad()
    def evaluate(self, model, solver, estimator):
        was = model.training
        model.eval()
        x, y = next(self.batches("test", 0))
        logits, _ = model(x, solver, estimator)
        model.train(was)
        return {"acc": (logits.argmax(1) == y).float().mean().item()}


def _resume_params(device: str, quick: bool) -> dict:
    return {"epochs": 2, "batch_size": 4 if quick else 32, "estimator": "upg",
            "pretrain_steps": 2, "optimizer": "sgd", "lr": 0.05, "checkpoint_every": 2,
            "diagnostics_every": 0, "memory_every": 0, "device": device,
            "model": {"preset": "tiny"}, "deterministic": True}


def resume_worker(args) -> None:
    """One training run (``--phase whole|interrupted|resumed``); writes its losses and
    weights under ``--out``."""
    from pipeline.experiments.checkpoint import load_checkpoint
    from pipeline.experiments.train import train
    from pipeline.experiments.train_config import TrainConfig
    from pipeline.tracking import NullRun
    device = _device(args)
    params = _resume_params(device, args.quick)
    cfg = TrainConfig.from_params(params)
    task = _RandomTask(device, 8 if args.quick else 32, cfg.batch_size, 4)
    out = Path(args.out)
    ck = out / "resume_ck" / "last.pt"
    resume = load_checkpoint(ck) if args.phase == "resumed" else None
    if args.phase == "interrupted":
        from pipeline.experiments import train as train_module
        real = train_module.train_step

        def slow_after_checkpoint(cfg, task, model, opt, sched, batch, state, *a, **k):
            if state["step"] == 5:  # the step-4 checkpoint is on disk: wait for the kill
                print("READY", flush=True)
                time.sleep(600)
            return real(cfg, task, model, opt, sched, batch, state, *a, **k)

        train_module.train_step = slow_after_checkpoint
    results = train(cfg, task, NullRun(), None if args.phase == "whole" else ck,
                    log=lambda m: None, resume=resume,
                    weights=out / f"resume_{args.phase}.pt")
    losses = [r["train/loss"] for r in results["curves"]]
    (out / f"resume_{args.phase}.json").write_text(json.dumps({"losses": losses}))


def resume_check(args) -> dict:
    out = Path(args.out)
    base = [sys.executable, "-m", "benchmarks.gpu_check", "resume-worker", "--out", str(out)]
    base += ["--quick"] if args.quick else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(base + ["--phase", "interrupted"], stdout=subprocess.PIPE, text=True)
    # the uninterrupted run, here, while the other process starts (it writes no checkpoint)
    resume_worker(argparse.Namespace(**{**vars(args), "phase": "whole"}))
    for line in proc.stdout:
        if line.strip() == "READY":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(base + ["--phase", "resumed"], check=True)
    whole = json.loads((out / "resume_whole.json").read_text())["losses"]
    resumed = json.loads((out / "resume_resumed.json").read_text())["losses"]
    w1 = torch.load(out / "resume_whole.pt", weights_only=True)
    w2 = torch.load(out / "resume_resumed.pt", weights_only=True)
    equal_weights = all(torch.equal(w1[k], w2[k]) for k in w1)
    result = {"device": _device(args), "steps": len(whole), "losses_equal": whole == resumed,
              "weights_bitwise_equal": equal_weights, "killed_with": "SIGKILL after the "
              "step-4 checkpoint", "seconds": time.perf_counter() - t0}
    print(json.dumps(result), flush=True)
    return result


# --- CLI ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["solve-profile", "train-step", "resume", "resume-worker"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="CPU rehearsal: tiny shapes")
    p.add_argument("--phase", choices=["whole", "interrupted", "resumed"])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "solve-profile":
        rows = solve_profile(args)
        write_csv(rows, args.out / "solve_profile.csv", sorted({k for r in rows for k in r}))
    elif args.step == "train-step":
        rows = train_step_rows(args)
        write_csv(rows, args.out / "train_step.csv", list(rows[0]))
    elif args.step == "resume":
        result = resume_check(args)
        (args.out / "resume_check.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0 if result["losses_equal"] and result["weights_bitwise_equal"] else 1
    else:
        resume_worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
