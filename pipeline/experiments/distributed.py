"""Data-parallel training for the shared loop: one process, or ``torchrun`` with N ranks.

    torchrun --standalone --nproc_per_node=2 -m pipeline train --study vision ...

``python -m pipeline train`` reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
(:func:`from_env`); without them it is one process and nothing here does anything. With
them, the process group uses gloo on the CPU and NCCL on CUDA, each rank takes its slice
of the (seed, epoch) order (:func:`pipeline.experiments.sampling.rank_batches`), the model is
wrapped in DistributedDataParallel (:func:`wrap`), and every value the loop decides on
(the loss, the solver's residual, a divergence) is all-reduced first, so every rank takes
the same branch: a divergence stops them all at the same step, never one rank alone.

``find_unused_parameters=True``: a phase can leave parameters without a gradient (the
pretraining stage, an estimator that skips a part), and DDP would then wait for them
forever. The phantom and implicit backward passes work through DDP unchanged: their
custom autograd Functions and the hook on h* call ``torch.autograd.grad`` with respect to
the state only, which never reaches a parameter's AccumulateGrad node, the point where
DDP's reducer hooks in; the parameter gradients then arrive through ordinary autograd.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

Tensor = torch.Tensor

# How each kind of per-step value is combined over ranks.
MEAN, MAX, MIN = "mean", "max", "min"


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size and local rank (GPU index)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """torchrun's environment as a :class:`Dist`; one process when ``WORLD_SIZE`` is unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(d: Dist, device: str) -> str:
    """Join the process group (gloo on the CPU, NCCL on CUDA); return this rank's device
    (``cuda`` becomes ``cuda:<local rank>``). Nothing to do for one process."""
    if not d.active:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                rank=d.rank, world_size=d.world_size)
    return device


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, device: str) -> nn.Module:
    """``model`` itself for one process; else DistributedDataParallel around it (which
    broadcasts rank 0's parameters and buffers, so every rank starts from the same model).
    SyncBatchNorm is not used: the paper ran without it (per-rank BatchNorm statistics)."""
    if not d.active:
        return model
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=True)


def reduce_values(values: dict[str, float], how: dict[str, str], d: Dist,
                  default: str = MEAN) -> dict[str, float]:
    """Combine per-rank scalars over ranks (``how[key]``: mean, max or min; else
    ``default``), in one all-reduce per kind. Every rank gets the same dict back."""
    if not d.active or not values:
        return dict(values)
    out = dict(values)
    for op_name, op in ((MEAN, dist.ReduceOp.SUM), (MAX, dist.ReduceOp.MAX),
                        (MIN, dist.ReduceOp.MIN)):
        keys = sorted(k for k in values if how.get(k, default) == op_name)
        if not keys:
            continue
        buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(buf, op=op)
        if op_name == MEAN:
            buf /= d.world_size
        out.update(zip(keys, buf.tolist()))
    return out


def sum_tensor(values: Tensor, d: Dist) -> Tensor:
    """``values`` summed over ranks (a copy; float64 on the CPU, as gloo needs)."""
    buf = values.detach().to("cpu", torch.float64).clone()
    if d.active:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf


def average_gradients(model: nn.Module, d: Dist) -> None:
    """Average ``p.grad`` over ranks by hand, as DDP's reducer does, for a step whose
    backward ran under ``no_sync()`` (the diagnostics read rank 0's own gradient first).
    A parameter without a gradient on every rank keeps ``None``, as under DDP."""
    if not d.active:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    has = sum_tensor(torch.tensor([float(p.grad is not None) for p in params]), d)
    for p, n in zip(params, has.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= d.world_size


def gather(obj, d: Dist) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, d: Dist):
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: nn.Module, d: Dist) -> None:
    """Rank 0's buffers (BatchNorm running statistics) onto every rank, so that an
    evaluation sees one model. DDP does this at the start of each training forward; after
    the last one each rank has updated its own copy."""
    if not d.active:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
