"""Jacobian regularization (Bai, Koltun, Kolter, ICML 2021; appendix §4.3 uses it with UPG).

The penalty is ||dF/dh||_F^2 at the fixed point h*, estimated as Hutchinson does and as
the official ``jac_loss_estimate``: for v ~ N(0, I), E ||v^T J||^2 = tr(J J^T) = ||J||_F^2,
so one vector-Jacobian product (with ``create_graph``, so the penalty has a gradient in
the parameters) gives an unbiased estimate. Averaged over M samples and divided by
numel(h) (batch x length x width: the official normalisation).

It reads the layer record of the shared loop (:func:`pipeline.deq.record_layers`: F and
h* of each implicit layer of a forward), so any model (DEQ-Transformer, MDEQ, IGNN) can
use it; a stack of implicit layers sums its layers' penalties. F is evaluated once more at
h* (the official code reuses the F call of its backward hook; here the estimator's graph
is its own).

When it applies (:class:`JacobianRegConfig`): on a step with probability ``freq``, drawn
from a generator seeded by (seed, step), so a resumed run repeats the same draws; only
after pretraining; never at evaluation (the caller only asks during training steps). The
weight grows by ``incr`` every ``incr_every`` steps (the official +0.1 every N steps).

>>> import torch
>>> W = torch.nn.Parameter(0.5 * torch.eye(3))
>>> h = torch.zeros(2, 3)
>>> value = frobenius_estimate(lambda x: torch.tanh(x @ W + 1.0), h, samples=4,
...                            generator=torch.Generator().manual_seed(0))
>>> value.backward(); W.grad.shape
torch.Size([3, 3])
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


def frobenius_estimate(func: Callable[[Tensor], Tensor], h_star: Tensor, samples: int = 1,
                       generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson's estimate of ||dF/dh||_F^2 / numel(h) at ``h_star``, differentiable in
    F's parameters: mean over ``samples`` draws v ~ N(0, I) of ||v^T J||^2, divided by
    h's number of elements. ``generator`` draws v (on the CPU, in float32, then moved and
    cast), so a seeded call repeats, in any dtype."""
    with torch.enable_grad():
        x = h_star.detach().requires_grad_()
        y = func(x)
        total = y.new_zeros(())
        for _ in range(samples):
            # drawn in float32 whatever y's dtype, so a float64 replay of the step (the
            # diagnostics' reference) uses the step's own vectors
            v = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y)
            (vjp,) = torch.autograd.grad(y, x, v, create_graph=True, retain_graph=True)
            total = total + vjp.pow(2).sum()
    return total / (samples * x.numel())


def jacobian_penalty(layers: Sequence, samples: int = 1,
                     generator: torch.Generator | None = None) -> Tensor:
    """The estimate summed over the implicit layers of a record (``LayerRecord``: func,
    h_star)."""
    if not layers:
        raise ValueError("Jacobian regularization needs the layer record of a solving "
                         "forward; this forward solved no implicit layer")
    return sum(frobenius_estimate(r.func, r.h_star, samples, generator) for r in layers)
