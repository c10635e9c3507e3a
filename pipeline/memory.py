"""Tensor memory on any device: CUDA's allocator statistics, or on the CPU a counter of
the tensor storages that ATen ops create (CPU PyTorch has no allocator statistics).

The CPU counter is a ``TorchDispatchMode``: every tensor an op returns whose storage is
new (not one of the op's inputs' storages) adds its storage's bytes, and a weak-reference
finaliser on the storage subtracts them when it is freed. It sees every tensor autograd
saves for backward, every temporary of the backward and the parameter gradients; it does
not see scratch space an op allocates and frees internally, nor tensors made before the
measurement starts. It slows every op, so a step measured with it is not timed.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Tensor = torch.Tensor


class TensorMemory(TorchDispatchMode):
    """Live bytes of the tensor storages that ATen ops create inside the context.

    ``current`` / ``peak`` count from zero at entry; ``mark()`` starts a second peak,
    ``peak_since_mark``, at the current level.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.peak_since_mark = 0
        self._live: dict[int, int] = {}

    def mark(self) -> None:
        self.peak_since_mark = self.current

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(st) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)
                  for st in _storages(t)}
        for st in (st for t in tree_flatten(out)[0] if isinstance(t, Tensor)
                   for st in _storages(t)):
            key = id(st)
            if key in inputs:
                continue  # a view of, or an in-place write to, an existing tensor
            size = st.nbytes()
            if key in self._live:  # an ``out=`` storage that was resized
                self.current += size - self._live[key]
                self._live[key] = size
                continue
            self._live[key] = size
            self.current += size
            weakref.finalize(st, self._freed, key)
        self.peak = max(self.peak, self.current)
        self.peak_since_mark = max(self.peak_since_mark, self.current)
        return out


def _storages(t: Tensor) -> list:
    """The storages behind a tensor: its own (strided), its indices' and values' (sparse
    COO, which has no storage of its own); other layouts are not counted."""
    if t.layout == torch.strided:
        return [t.untyped_storage()]
    if t.layout == torch.sparse_coo:
        return [t._indices().untyped_storage(), t._values().untyped_storage()]
    return []


class PeakMemory:
    """``peak_mb`` after the block: the peak tensor memory above the level at entry."""

    peak_mb: float = float("nan")


@contextmanager
def peak_memory(device: str) -> Iterator[PeakMemory]:
    """Measure the peak tensor memory of a block (MiB above the level at entry)."""
    result = PeakMemory()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    with TensorMemory() as counter:
        yield result
    result.peak_mb = counter.peak / 2**20
