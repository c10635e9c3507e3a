"""Tests for ``pipeline.deq.spectral``: power method, rho(dF_lam/dh), spectral norm.

Linear maps with known eigenvalues (symmetric matrices, so the eigenvalues are
real and the power method converges) are the references; the damped map
F_lam = (1-lam) h + lam F(h) has Jacobian (1-lam) I + lam J (appendix Eq. A-11),
whose eigenvalues are (1-lam) + lam mu for the eigenvalues mu of J.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.deq import (jacobian_spectral_radius, power_method, spectral_norm,
                          spectral_normalize)

DTYPE = torch.float64


def symmetric_with_eigenvalues(eigs, seed: int = 0) -> torch.Tensor:
    """Q diag(eigs) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    return Q @ torch.diag(torch.tensor(eigs, dtype=DTYPE)) @ Q.T


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("eigs,rho", [
    ([0.9, 0.5, -0.3, 0.1, 0.05, -0.02], 0.9),
    ([-1.7, 0.4, 0.3, -0.2, 0.1, 0.0], 1.7),     # dominant eigenvalue negative
    ([2.5, 2.0, -1.0, 0.5, 0.2, 0.1, 0.0, -0.1], 2.5),
])
def test_power_method_on_a_symmetric_linear_map(eigs, rho):
    A = symmetric_with_eigenvalues(eigs)
    bsz = 4
    est = power_method(lambda v: v @ A, torch.Size([bsz, len(eigs)]), iters=60,
                       generator=gen(), dtype=DTYPE)
    assert est.shape == (bsz,)
    torch.testing.assert_close(est, torch.full((bsz,), rho, dtype=DTYPE), atol=1e-3, rtol=0)


def test_power_method_per_sample_on_a_batched_map():
    """Samples do not mix: each gets its own spectral radius."""
    As = torch.stack([symmetric_with_eigenvalues([r, 0.3, -0.2, 0.1], seed=i)
                      for i, r in enumerate([0.5, 0.9, 1.3])])
    est = power_method(lambda v: torch.einsum("bi,bij->bj", v, As), torch.Size([3, 4]),
                       iters=80, generator=gen(), dtype=DTYPE)
    torch.testing.assert_close(est, torch.tensor([0.5, 0.9, 1.3], dtype=DTYPE), atol=1e-3, rtol=0)


def test_power_method_on_an_image_shaped_state():
    """A (B, C, H, W) state: the norms are taken over all trailing dims."""
    A = symmetric_with_eigenvalues([0.8, 0.4, 0.2, -0.1, 0.05, 0.0, 0.3, -0.6])
    shape = torch.Size([2, 2, 2, 2])
    vjp = lambda v: (v.reshape(2, 8) @ A).reshape(shape)  # noqa: E731
    est = power_method(vjp, shape, iters=80, generator=gen(), dtype=DTYPE)
    torch.testing.assert_close(est, torch.full((2,), 0.8, dtype=DTYPE), atol=1e-3, rtol=0)


def test_power_method_is_reproducible_with_a_generator():
    A = symmetric_with_eigenvalues([0.9, 0.85, 0.1])
    a = power_method(lambda v: v @ A, torch.Size([2, 3]), iters=5, generator=gen(3), dtype=DTYPE)
    b = power_method(lambda v: v @ A, torch.Size([2, 3]), iters=5, generator=gen(3), dtype=DTYPE)
    assert torch.equal(a, b)


@pytest.mark.parametrize("lam", [1.0, 0.8, 0.5, 0.2])
def test_damped_spectral_radius_on_a_psd_linear_map(lam):
    """J PSD with eigenvalues in [0, 1.6]: rho(J_lam) = (1-lam) + lam * 1.6."""
    eigs = [1.6, 1.0, 0.7, 0.3, 0.1, 0.0]
    A = symmetric_with_eigenvalues(eigs)
    h = torch.randn(3, len(eigs), generator=gen(1), dtype=DTYPE)
    rho = jacobian_spectral_radius(lambda x: x @ A, h, lam=lam, iters=100, generator=gen())
    expected = (1 - lam) + lam * max(eigs)
    torch.testing.assert_close(rho, torch.full((3,), expected, dtype=DTYPE), atol=1e-3, rtol=0)
    assert not rho.requires_grad


def test_damping_can_move_the_dominant_eigenvalue():
    """J with eigenvalues {-0.95, 0.5, ...}: rho(J) = 0.95, but J_0.5 has eigenvalues
    (1 + mu)/2 = {0.025, 0.75, ...}, so rho(J_0.5) = 0.75 comes from mu = 0.5."""
    eigs = [-0.95, 0.5, 0.3, -0.2, 0.1]
    A = symmetric_with_eigenvalues(eigs, seed=2)
    h = torch.zeros(2, len(eigs), dtype=DTYPE)
    f = lambda x: x @ A  # noqa: E731
    rho = jacobian_spectral_radius(f, h, lam=1.0, iters=100, generator=gen())
    torch.testing.assert_close(rho, torch.full((2,), 0.95, dtype=DTYPE), atol=1e-3, rtol=0)
    rho_half = jacobian_spectral_radius(f, h, lam=0.5, iters=200, generator=gen())
    expected = max(abs(0.5 + 0.5 * mu) for mu in eigs)
    assert expected == pytest.approx(0.75)
    torch.testing.assert_close(rho_half, torch.full((2,), expected, dtype=DTYPE), atol=1e-3,
                               rtol=0)


def test_spectral_radius_of_a_nonlinear_map_matches_dense_eigenvalues():
    """F(h) = tanh(h W + c), W symmetric: J = diag(d) W^T has real eigenvalues
    (similar to diag(d)^1/2 W diag(d)^1/2); compare with a dense eigen-solve."""
    n = 6
    W = symmetric_with_eigenvalues([1.2, -0.4, 0.3, 0.2, -0.1, 0.05], seed=3)
    c = torch.randn(n, generator=gen(4), dtype=DTYPE)
    h = 0.5 * torch.randn(2, n, generator=gen(5), dtype=DTYPE)
    f = lambda x: torch.tanh(x @ W + c)  # noqa: E731
    rho = jacobian_spectral_radius(f, h, iters=300, generator=gen())
    for i in range(2):
        J = torch.autograd.functional.jacobian(lambda x: f(x[None])[0], h[i])
        expected = torch.linalg.eigvals(J).abs().max().real
        assert rho[i].item() == pytest.approx(expected.item(), abs=1e-3)


@pytest.mark.parametrize("target", [0.5, 0.9, 1.0, 3.0])
def test_spectral_normalize_hits_the_target(target):
    W = torch.randn(7, 5, generator=gen(6), dtype=DTYPE)
    Wn = spectral_normalize(W, target)
    assert torch.linalg.matrix_norm(Wn, ord=2).item() == pytest.approx(target, rel=1e-12)
    assert spectral_norm(Wn).item() == pytest.approx(target, rel=1e-12)
    # Direction unchanged: a positive rescaling of W.
    torch.testing.assert_close(Wn / Wn.norm(), W / W.norm())


def test_spectral_normalize_makes_tanh_layer_a_contraction():
    W = spectral_normalize(torch.randn(6, 6, generator=gen(7), dtype=DTYPE), 0.9)
    h = torch.randn(4, 6, generator=gen(8), dtype=DTYPE)
    rho = jacobian_spectral_radius(lambda x: torch.tanh(x @ W), h, iters=200, generator=gen())
    assert (rho <= 0.9 + 1e-6).all()


def test_spectral_norm_is_the_largest_singular_value():
    W = torch.randn(5, 8, generator=gen(9), dtype=DTYPE)
    assert spectral_norm(W).item() == pytest.approx(torch.linalg.svdvals(W)[0].item(), rel=1e-12)


@pytest.mark.parametrize("target", [0.0, -1.0])
def test_spectral_normalize_rejects_non_positive_targets(target):
    with pytest.raises(ValueError):
        spectral_normalize(torch.eye(3), target)


def test_power_iteration_reports_its_iterations_and_whether_it_settled():
    from pipeline.deq import power_iteration
    A = torch.diag(torch.tensor([0.9, 0.5, 0.1], dtype=DTYPE))
    est = power_iteration(lambda v: v @ A, torch.Size([2, 3]), iters=500, generator=gen(),
                          dtype=DTYPE, tol=1e-8)
    assert est.settled and est.iters < 500 and est.change <= 1e-8
    torch.testing.assert_close(est.rho, torch.full((2,), 0.9, dtype=DTYPE), rtol=1e-6, atol=0)
    # eigenvalues +-i/sqrt(2): a complex leading pair, the estimate oscillates and never settles
    R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=DTYPE)
    S = torch.diag(torch.tensor([1.0, 0.5, 0.0], dtype=DTYPE)) @ R
    est = power_iteration(lambda v: v @ S, torch.Size([1, 3]), iters=50, generator=gen(),
                          dtype=DTYPE, tol=1e-6)
    assert not est.settled and est.iters == 50 and est.change > 1e-6
