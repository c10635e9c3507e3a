"""The synthetic implicit model of appendix §4.1 (Eq. A-43): h* = F(h* + u).

F(x) = tanh(x W) is a one-layer network whose weight W is symmetric and
spectral-normalised to ||W||_2 = L_h; tanh is 1-Lipschitz, so F is
L_h-Lipschitz in h. Rows of h (the N axis) do not interact.

Two constructions of W (``weight`` in params.yaml):

* ``spread``: W = Q diag(mu) Q^T, Q a random orthogonal basis, the eigenvalues mu
  evenly spaced over [-L_h, L_h]. Its extreme eigenvalue is +L_h in every draw, so
  I - dF/dh nears singularity as L_h -> 1 (the ill-conditioning appendix Fig. 1 is about).
* ``gaussian``: W = (A + A^T) / 2, A ~ N(0, 1), rescaled to spectral norm L_h. Its
  extreme eigenvalue is -L_h in about half the draws; I - dF/dh then stays well
  conditioned whatever L_h is, and the seed decides which case one gets.

>>> import torch
>>> W = symmetric_weight(4, 0.9, torch.Generator().manual_seed(0))
>>> norm, top = torch.linalg.matrix_norm(W, ord=2), torch.linalg.eigvalsh(W)[-1]
>>> round(float(norm), 6), round(float(top), 6)
(0.9, 0.9)
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.deq import spectral_normalize

Tensor = torch.Tensor

WEIGHTS = ("spread", "gaussian")


def spread_weight(dim: int, Lh: float, generator: torch.Generator,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """W = Q diag(linspace(-L_h, L_h, dim)) Q^T with Q Haar-orthogonal (QR of a Gaussian
    matrix, signs fixed by R's diagonal); built in float64, then cast to ``dtype``."""
    A = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R))  # the Haar measure needs the sign fix (Mezzadri 2007)
    # dim = 1 has one eigenvalue: +L_h, the ill-conditioned end
    mu = torch.linspace(-Lh, Lh, dim, dtype=torch.float64) if dim > 1 else \
        torch.tensor([Lh], dtype=torch.float64)
    W = (Q * mu) @ Q.T
    return ((W + W.T) / 2).to(dtype)  # exactly symmetric after rounding


def gaussian_weight(dim: int, Lh: float, generator: torch.Generator,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """W = (A + A^T) / 2 with A ~ N(0, 1), rescaled to spectral norm L_h (the earlier default)."""
    A = torch.randn(dim, dim, generator=generator, dtype=dtype)
    return spectral_normalize((A + A.T) / 2, Lh)


def symmetric_weight(dim: int, Lh: float, generator: torch.Generator,
                     dtype: torch.dtype = torch.float64, kind: str = "spread") -> Tensor:
    """A symmetric W with ||W||_2 = L_h, built the way ``kind`` (one of ``WEIGHTS``) names."""
    if kind == "spread":
        return spread_weight(dim, Lh, generator, dtype)
    if kind == "gaussian":
        return gaussian_weight(dim, Lh, generator, dtype)
    raise ValueError(f"synthetic weight {kind!r} is not one of {list(WEIGHTS)}")


def equilibrium_func(W: Tensor, u: Tensor) -> Callable[[Tensor], Tensor]:
    """F(h) = tanh((h + u) W), acting on the last axis; u is the input injection."""
    return lambda h: torch.tanh((h + u) @ W)


def jacobian_spectral_radius(W: Tensor, u: Tensor, h: Tensor) -> Tensor:
    """rho(dF/dh) at h, exactly, per row of h (shape h.shape[:-1]).

    Row by row, dF/dh = diag(s) W with s = tanh'((h + u) W) = 1 - F(h)^2 >= 0 and W
    symmetric: it has the eigenvalues of the symmetric S^1/2 W S^1/2 (AB and BA share
    their nonzero eigenvalues), which ``eigvalsh`` gives in float64, several times faster
    than a general eigen-solve of the dense Jacobian and without the power method's bias.
    """
    s = (1 - torch.tanh((h + u) @ W) ** 2).double().clamp_min(0).sqrt()
    sym = s.unsqueeze(-1) * W.double() * s.unsqueeze(-2)
    return torch.linalg.eigvalsh(sym).abs().amax(dim=-1)
