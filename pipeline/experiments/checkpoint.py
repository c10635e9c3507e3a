"""Checkpoints of a training run: save, load, resume.

A checkpoint holds tensors and plain containers only (``torch.load(weights_only=True)``):
model, optimizer, scheduler, each rank's RNG states (CPU, and CUDA's), the loop state
(with a task's own state, such as the lm task's segment memory) and the MLflow run id.
The loop writes it under ``<checkpoints>/<study>/<name>/<params hash>/last.pt`` at each
epoch end and every ``checkpoint_every`` steps; a killed job resumes from it mid-epoch,
equal to an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.experiments import distributed
from pipeline.experiments.diagnostics import rng_state, set_rng_state
from pipeline.io import atomic_path


def save_checkpoint(path: Path, model, opt, sched, state: dict, run_id, device: str,
                    rng: list | None = None) -> None:
    """Tensors and plain containers only; ``rng`` holds one entry per rank, in rank order
    (this process's alone when not given)."""
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "rng": rng or [rng_state(device)],
               "state": state, "run_id": run_id,
               # a resume is bitwise equal to an uninterrupted run only where this is True
               "deterministic": torch.are_deterministic_algorithms_enabled()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_weights(path: Path, model) -> None:
    """The model's state dict alone (``torch.load(path, weights_only=True)`` reads it)."""
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def load_checkpoint(path: Path) -> dict:
    """``weights_only=True`` onto the CPU: the RNG states must stay CPU ByteTensors, and
    load_state_dict moves the rest onto the model's device."""
    return torch.load(path, map_location="cpu", weights_only=True)



def save_run(path: Path | None, model, opt, sched, task, state: dict, run_id, device: str,
             d: distributed.Dist) -> None:
    """Checkpoint the loop: every rank's RNG state (gathered, in rank order) and, for a
    task with ``state_dict``, its state (every rank's under DDP: its own segment memory)
    go into ``state``; rank 0 writes the file (none when ``path`` is None)."""
    if hasattr(task, "state_dict"):
        state["task"] = task.state_dict()
        if d.active:
            state["task_ranks"] = distributed.gather(state["task"], d)
    rngs = distributed.gather(rng_state(device), d)
    if path is not None and d.is_main:
        save_checkpoint(path, model, opt, sched, state, run_id, device, rngs)


def restore(ck: dict, model, opt, sched, task, d: distributed.Dist, path: Path | None = None
            ) -> dict:
    """Load a checkpoint from :func:`load_checkpoint` into the model, optimizer, scheduler,
    this rank's RNG and the task; return the loop state. A checkpoint written by another
    number of ranks is refused (the batch order and steps per epoch depend on it)."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if len(ck["rng"]) != d.world_size:
        raise ValueError(f"{path or 'the checkpoint'} was written by "
                         f"{len(ck['rng'])} rank(s); resume it with as many, not "
                         f"{d.world_size} (or delete it to start over)")
    set_rng_state(ck["rng"][d.rank])
    state = ck["state"]
    if "task" in state:  # a task's own state across steps (segment memory)
        task.load_state_dict(state["task_ranks"][d.rank] if "task_ranks" in state
                             else state["task"])
    return state
