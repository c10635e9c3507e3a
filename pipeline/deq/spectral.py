"""Spectral tools: power-method estimates of rho(dF/dh) and spectral normalisation.

The power method uses vector-Jacobian products only, never a dense Jacobian:
v <- v^T J / ||v^T J||, and rho ~ ||v^T J|| / ||v|| per sample. For the damped
map F_lam = (1-lam) I + lam F, J_lam = (1-lam) I + lam J (appendix Eq. A-11).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass
class PowerEstimate:
    """A power-method estimate, per sample, and whether it settled.

    Attributes:
        rho: (B,) estimate ||v_T^T J|| / ||v_T||.
        iters: VJPs used.
        settled: every sample's estimate changed by at most ``tol`` (relative) in the
            last iteration. A complex leading pair makes the estimate oscillate and never
            settle; it is then only a rough value of rho.
        change: the largest relative change of the last iteration.
    """

    rho: Tensor
    iters: int
    settled: bool
    change: float


def power_iteration(vjp: Callable[[Tensor], Tensor], shape: torch.Size, iters: int = 20,
                    generator: torch.Generator | None = None, dtype=torch.float32,
                    device=None, tol: float | None = None) -> PowerEstimate:
    """Power method on J from ``vjp(v) = v^T J``, per sample; stops early once settled
    when ``tol`` is given, else runs all ``iters``."""
    v = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    dims = tuple(range(1, len(shape)))
    rho = torch.zeros(shape[0], dtype=dtype, device=device)
    change, used = float("inf"), 0
    for used in range(1, iters + 1):
        v = v / torch.linalg.vector_norm(v, dim=dims, keepdim=True).clamp_min(1e-30)
        w = vjp(v)
        new = torch.linalg.vector_norm(w, dim=dims)
        if used > 1:
            change = ((new - rho).abs() / new.clamp_min(1e-30)).max().item()
        rho, v = new, w
        if tol is not None and change <= tol:
            break
    return PowerEstimate(rho, used, tol is not None and change <= tol, change)


def power_method(vjp: Callable[[Tensor], Tensor], shape: torch.Size, iters: int = 20,
                 generator: torch.Generator | None = None, dtype=torch.float32,
                 device=None) -> Tensor:
    """Estimate the spectral radius of J, per sample, from ``vjp(v) = v^T J``.

    Returns a tensor of shape (B,): ||v_T^T J|| / ||v_T|| after ``iters`` steps.
    For a J whose leading eigenvalues are a complex pair the estimate oscillates
    around rho; it is the power method the paper uses (appendix §4.3).
    """
    return power_iteration(vjp, shape, iters, generator, dtype, device).rho


def spectral_radius(func: Callable[[Tensor], Tensor], h: Tensor, lam: float = 1.0,
                    iters: int = 20, generator: torch.Generator | None = None,
                    tol: float | None = None) -> PowerEstimate:
    """rho(dF_lam/dh) at h, per sample, with F_lam = (1-lam) h + lam F(h) (appendix
    Eq. A-11); lam=1 gives rho(dF/dh). Returns the estimate with its iteration count."""
    with torch.enable_grad():
        x = h.detach().requires_grad_()
        y = func(x)
        y = y if lam == 1.0 else (1 - lam) * x + lam * y

        def vjp(v: Tensor) -> Tensor:
            return torch.autograd.grad(y, x, v, retain_graph=True)[0]

        est = power_iteration(vjp, x.shape, iters, generator, x.dtype, x.device, tol)
    est.rho = est.rho.detach()
    return est


def jacobian_spectral_radius(func: Callable[[Tensor], Tensor], h: Tensor, lam: float = 1.0,
                             iters: int = 20, generator: torch.Generator | None = None) -> Tensor:
    """rho(dF_lam/dh) at h, per sample, after exactly ``iters`` power steps."""
    return spectral_radius(func, h, lam, iters, generator).rho


def spectral_norm(weight: Tensor) -> Tensor:
    """Largest singular value of a matrix (exact, by SVD)."""
    return torch.linalg.matrix_norm(weight, ord=2)


def spectral_normalize(weight: Tensor, target: float) -> Tensor:
    """Rescale ``weight`` so that its spectral norm equals ``target`` (Miyato et al., 2018).

    With a 1-Lipschitz activation, F(h) = act(h W) is then ``target``-Lipschitz in h.
    """
    if target <= 0:
        raise ValueError(f"spectral_normalize: target={target} must be > 0")
    return weight * (target / spectral_norm(weight))
