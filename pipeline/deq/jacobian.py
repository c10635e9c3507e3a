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

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class JacobianRegConfig:
    """When and how strongly the penalty is added to the training loss.

    Args:
        weight: the penalty's weight at step 0 (official PostLN 1.9, PreLN 2.0; the
            appendix's UPG runs: 0.1). 0 turns it off.
        freq: probability that a training step adds it (official 0.35 PostLN, 0.4 PreLN).
        incr: added to the weight every ``incr_every`` steps (official: 0.1).
        incr_every: steps between increments; 0: the weight stays put.
        samples: M, Hutchinson vectors per estimate (official: 1).
        seed: seeds the per-step draws (application and vectors).
    """

    weight: float = 0.0
    freq: float = 0.0
    incr: float = 0.0
    incr_every: int = 0
    samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.incr < 0:
            raise ValueError(f"JR weight={self.weight} and incr={self.incr} must be >= 0")
        if not 0.0 <= self.freq <= 1.0:
            raise ValueError(f"JR freq={self.freq} must be a probability in [0, 1]")
        if self.incr_every < 0 or self.samples < 1:
            raise ValueError(f"JR incr_every={self.incr_every} must be >= 0 and "
                             f"samples={self.samples} >= 1")

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or (self.incr > 0 and self.incr_every > 0)

    def weight_at(self, step: int) -> float:
        """The weight at training step ``step``: weight + incr x floor(step / incr_every)."""
        if not self.incr_every:
            return self.weight
        return self.weight + self.incr * (step // self.incr_every)

    def generator(self, step: int) -> torch.Generator:
        """The draws of step ``step``: the same on a resumed run."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def vector_generator(self, step: int) -> torch.Generator:
        """The Hutchinson vectors of step ``step`` (a stream apart from ``generator``)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7_919 * 1_000_003)

    def applies(self, step: int, pretraining: bool) -> bool:
        """Whether training step ``step`` adds the penalty: never in pretraining, else with
        probability ``freq`` (seeded by the step)."""
        if pretraining or not self.enabled or self.freq == 0.0:
            return False
        return bool(torch.rand((), generator=self.generator(step)).item() < self.freq)


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
