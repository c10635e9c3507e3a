"""Jacobian regularization (pipeline/deq/jacobian.py): Hutchinson's estimate against the
exact ||dF/dh||_F^2 of a small Jacobian, its gradient, the layer record, and the seeded
schedule (application probability, weight increments)."""
from __future__ import annotations

import pytest
import torch

from pipeline.deq import (EstimatorConfig, JacobianRegConfig, SolverConfig, dense_jacobian,
                          frobenius_estimate, implicit_layer, jacobian_penalty, record_layers)

B, N = 3, 6


def small_problem():
    torch.manual_seed(0)
    W = torch.nn.Parameter(0.6 * torch.randn(N, N, dtype=torch.float64) / N ** 0.5)
    u = torch.randn(B, N, dtype=torch.float64)
    return W, (lambda h: torch.tanh(h @ W + u)), torch.randn(B, N, dtype=torch.float64)


def exact_value(func, h) -> torch.Tensor:
    """||dF/dh||_F^2 / numel(h) from the dense per-sample Jacobian (samples independent)."""
    with torch.enable_grad():
        x = h.detach().requires_grad_()
        J = dense_jacobian(func(x), x)
    return J.pow(2).sum() / h.numel()


def test_hutchinson_mean_matches_the_exact_frobenius_norm():
    _, func, h = small_problem()
    exact = exact_value(func, h).item()
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([frobenius_estimate(func, h, 1, gen).detach() for _ in range(4000)])
    # unbiased: the mean of 4,000 one-sample estimates within 4 standard errors
    stderr = draws.std().item() / len(draws) ** 0.5
    assert abs(draws.mean().item() - exact) < 4 * stderr
    assert stderr < 0.05 * exact          # and the check is sharp: 4 s.e. is under 20%
    # M samples in one call average M draws: the same value as their mean
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    five = frobenius_estimate(func, h, 5, g1)
    singles = torch.stack([frobenius_estimate(func, h, 1, g2) for _ in range(5)]).mean()
    torch.testing.assert_close(five, singles)


def test_one_vector_gives_exactly_its_vjp_norm_and_its_gradient():
    """For a fixed v the estimate is ||v^T J||^2 / numel, J dense, and its gradient in W
    is the gradient of that expression."""
    W, func, h = small_problem()
    value = frobenius_estimate(func, h, 1, torch.Generator().manual_seed(3))
    # drawn in float32 and cast, whatever F's dtype (a float64 replay reuses the step's)
    v = torch.randn(B, N, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float32).double()
    full = torch.autograd.functional.jacobian(func, h.detach(), create_graph=True)
    J = torch.stack([full[b, :, b, :] for b in range(B)])  # (B, n, n), differentiable in W
    expected = torch.einsum("bi,bij->bj", v, J).pow(2).sum() / h.numel()
    torch.testing.assert_close(value, expected)
    (g_value,) = torch.autograd.grad(value, W)
    (g_expected,) = torch.autograd.grad(expected, W)
    torch.testing.assert_close(g_value, g_expected)
    assert g_value.abs().sum() > 0


def test_penalty_reads_the_layer_record_of_a_forward():
    W, func, _ = small_problem()
    with record_layers() as layers:
        h, _ = implicit_layer(func, torch.zeros(B, N, dtype=torch.float64),
                              SolverConfig("broyden", 40, 1e-10),
                              EstimatorConfig("upg", k=3, lam=0.5))
        h, _ = implicit_layer(func, h.detach(), SolverConfig("broyden", 40, 1e-10),
                              EstimatorConfig("upg", k=3, lam=0.5))
    assert len(layers) == 2
    total = jacobian_penalty(layers, 2, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    parts = [frobenius_estimate(r.func, r.h_star, 2, gen) for r in layers]
    torch.testing.assert_close(total, sum(parts))
    with pytest.raises(ValueError, match="solved no implicit layer"):
        jacobian_penalty([])


def test_schedule_is_seeded_by_the_step_and_skips_pretraining():
    cfg = JacobianRegConfig(weight=0.1, freq=0.35, incr=0.1, incr_every=100, seed=4)
    draws = [cfg.applies(s, pretraining=False) for s in range(2000)]
    # the same draws again (a resumed run) and from a fresh config
    assert draws == [JacobianRegConfig(**vars(cfg)).applies(s, False) for s in range(2000)]
    assert abs(sum(draws) / 2000 - 0.35) < 4 * (0.35 * 0.65 / 2000) ** 0.5
    assert draws != [JacobianRegConfig(**{**vars(cfg), "seed": 5}).applies(s, False)
                     for s in range(2000)]
    assert not any(cfg.applies(s, pretraining=True) for s in range(200))
    assert not JacobianRegConfig().applies(0, False)
    assert [cfg.weight_at(s) for s in (0, 99, 100, 250)] == pytest.approx([0.1, 0.1, 0.2, 0.3])
    assert JacobianRegConfig(weight=2.0, freq=1.0).applies(17, False)
    with pytest.raises(ValueError, match="freq=1.5"):
        JacobianRegConfig(weight=1.0, freq=1.5)
