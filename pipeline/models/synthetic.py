"""The synthetic implicit model of appendix §4.1 (Eq. A-43): h* = F(h* + u).

F(x) = tanh(x W) is a one-layer network whose weight W is symmetric and
spectral-normalised to ||W||_2 = L_h; tanh is 1-Lipschitz, so F is
L_h-Lipschitz in h. Rows of h (the N axis) do not interact.

>>> import torch
>>> W = symmetric_weight(4, 0.9, torch.Generator().manual_seed(0))
>>> round(float(torch.linalg.matrix_norm(W, ord=2)), 6)
0.9
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.deq import spectral_normalize

Tensor = torch.Tensor


def symmetric_weight(dim: int, Lh: float, generator: torch.Generator,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """W = (A + A^T) / 2 with A ~ N(0, 1), rescaled to spectral norm L_h."""
    A = torch.randn(dim, dim, generator=generator, dtype=dtype)
    return spectral_normalize((A + A.T) / 2, Lh)


def equilibrium_func(W: Tensor, u: Tensor) -> Callable[[Tensor], Tensor]:
    """F(h) = tanh((h + u) W), acting on the last axis; u is the input injection."""
    return lambda h: torch.tanh((h + u) @ W)
