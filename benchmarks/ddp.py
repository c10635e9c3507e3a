"""DDP step time on the CPU: 2 gloo ranks against 1 process, the same batch per rank.

Run from the repository root (``benchmarks/backward.py`` runs it too, unless ``--no-ddp``):

    .venv/bin/python -m benchmarks.ddp --config large_cifar --steps 5
    .venv/bin/python -m benchmarks.ddp --quick

Each process trains ``--steps`` steps (after ``--warmup`` untimed ones) of the shared loop's
own ``train_step`` (``pipeline.experiments.step``) on random tensors of the configuration's
shape, UPG A_{5,lam}: with one process the model is the plain module, with 2 ranks it is
wrapped in DistributedDataParallel (``pipeline.experiments.distributed.wrap``; gloo,
``find_unused_parameters``). Every rank has one torch thread and its own batch of
``--batch`` samples (weak scaling: each GPU of the official runs holds 32 or 16 samples), so
the ideal ratio is 1 and the excess is DDP's cost: the gradient all-reduce (11M parameters
for LARGE), the unused-parameter graph walk and the all-reduced step values. The row records
the median step time of rank 0, the ratio 2 ranks / 1, and the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine, write_csv

COLUMNS = ["config", "batch_per_rank", "image_size", "steps", "params", "step_1rank_s",
           "step_2ranks_s", "ratio_2ranks_over_1", "cpu", "cores", "torch", "load_avg"]
# (preset, image size, classes, batch per rank as the official runs, forward / backward
# budgets, lam): the configurations of the vision issue.
CONFIGS = {
    "large_cifar": ("large_cifar", 32, 10, 32, 18, 20, 0.5),
    "small_imagenet": ("small_imagenet", 224, 1000, 16, 26, 27, 0.6),
    "tiny": ("tiny", 32, 10, 32, 22, 24, 0.5),
}


class RandomImages:
    """A task on random tensors of the real shape: the loop's ``train_step`` needs only
    ``loss`` and ``pretrain_estimator``."""

    def __init__(self, model_config):
        self.model_config = model_config

    def pretrain_estimator(self, model):
        from pipeline.deq import EstimatorConfig
        return EstimatorConfig("unrolled", k=model.config.num_layers)

    def loss(self, model, batch, solver, estimator):
        x, y = batch
        logits, _ = model(x, solver, estimator)
        return torch.nn.functional.cross_entropy(logits, y), {"acc": 0.0}


def _steps(rank: int, world: int, folder: str, args) -> None:
    from pipeline.experiments import distributed
    from pipeline.experiments.optim import make_optimizer, make_scheduler
    from pipeline.experiments.step import train_step
    from pipeline.experiments.train_config import TrainConfig
    from pipeline.models.mdeq import MDEQ, MDEQConfig

    torch.set_num_threads(1)
    d = distributed.Dist(rank, world)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous",
                                             rank=rank, world_size=world)
    preset, size, classes, _, f_thres, b_thres, lam = CONFIGS[args.config]
    size = args.image_size or size
    cfg = TrainConfig.from_params({"estimator": "upg", "k": 5, "lam": lam, "pretrain_steps": 0,
                                   "f_max_iter": f_thres, "b_max_iter": b_thres,
                                   "optimizer": "sgd", "lr": 0.01, "diagnostics_every": 0,
                                   "memory_every": 0, "diverge_loss_factor": None})
    torch.manual_seed(0)
    config = MDEQConfig.from_params({"preset": preset}, in_channels=3, num_classes=classes,
                                    image_size=size)
    model = MDEQ(config).train()
    task = RandomImages(config)
    net = distributed.wrap(model, d, "cpu")
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, args.warmup + args.steps)
    state = {"epoch": 0, "step": 0, "memory_epoch": -1, "curves": []}
    gen = torch.Generator().manual_seed(rank)
    times = []
    for i in range(args.warmup + args.steps):
        batch = (torch.randn(args.batch, 3, size, size, generator=gen),
                 torch.randint(0, classes, (args.batch,), generator=gen))
        distributed.barrier(d)
        t0 = time.perf_counter()
        train_step(cfg, task, model, opt, sched, batch, state, cfg.diagnostics_config, net, d)
        distributed.barrier(d)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        state["step"] += 1
    if rank == 0:
        Path(folder, f"world{world}.txt").write_text(
            f"{statistics.median(times)} {sum(p.numel() for p in model.parameters())}")
    if world > 1:
        torch.distributed.destroy_process_group()


def run(args, log=print) -> dict:
    import torch.multiprocessing as mp
    preset, size, _, batch, *_ = CONFIGS[args.config]
    args.batch = args.batch or batch
    loads = [load_average()]
    with tempfile.TemporaryDirectory() as folder:
        _steps(0, 1, folder, args)
        one, params = Path(folder, "world1.txt").read_text().split()
        mp.spawn(_steps, args=(2, folder, args), nprocs=2, join=True)
        two, _ = Path(folder, "world2.txt").read_text().split()
    loads.append(load_average())
    info = machine()
    row = {"config": args.config, "batch_per_rank": args.batch,
           "image_size": args.image_size or size, "steps": args.steps, "params": int(params),
           "step_1rank_s": float(one), "step_2ranks_s": float(two),
           "ratio_2ranks_over_1": float(two) / float(one), "cpu": info["cpu"],
           "cores": info["cores"], "torch": info["torch"],
           "load_avg": statistics.median(loads)}
    log(f"DDP {args.config}, batch {args.batch} per rank: 1 process {float(one):.2f} s/step, "
        f"2 gloo ranks {float(two):.2f} s/step, ratio {row['ratio_2ranks_over_1']:.2f}")
    return row


def add_arguments(p, quick: bool = False) -> None:
    p.add_argument("--ddp-steps", type=int, default=2 if quick else 5,
                   help="timed DDP steps per process")
    p.add_argument("--ddp-warmup", type=int, default=1, help="untimed DDP steps first")
    p.add_argument("--ddp-batch", type=int, default=None,
                   help="samples per rank (the configuration's: 32 or 16)")
    p.add_argument("--ddp-csv", type=Path, default=Path("results/benchmarks/ddp.csv"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="large_cifar")
    p.add_argument("--quick", action="store_true", help="tiny at 8x8, batch 4, 2 steps")
    p.add_argument("--image-size", type=int, default=None)
    args, _ = p.parse_known_args(argv)
    add_arguments(p, args.quick)
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.image_size = "tiny", args.image_size or 8
        args.ddp_batch = args.ddp_batch or 4
    row = run(argparse.Namespace(config=args.config, steps=args.ddp_steps,
                                 warmup=args.ddp_warmup, batch=args.ddp_batch,
                                 image_size=args.image_size))
    write_csv([row], args.ddp_csv, COLUMNS)
    print(f"wrote {args.ddp_csv}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
