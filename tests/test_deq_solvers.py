"""Tests for the forward/backward root solvers in ``pipeline.deq.solvers``.

Every solver shares one signature ``solver(f, x0, max_iter, tol, stop_mode, ...)``
and returns ``(x_best, SolverStats)``. These tests check that each one

* reaches the tolerance on a contraction, in both stop modes;
* reports failure honestly where it cannot converge (``converged`` False, a
  ``reason``, the best iterate returned rather than the last);
* stops on NaN / Inf with ``diverged`` True and a finite iterate;
* is reachable through the registry, which rejects unknown names with a
  ``ValueError`` that lists the valid ones.

CPU, float64, a handful of unknowns: the whole file runs in about a second.
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.deq import SOLVERS, SolverConfig, SolverStats, get_solver, solve
from pipeline.deq.spectral import spectral_normalize

DTYPE = torch.float64
SOLVER_NAMES = ("fixed_point", "anderson", "broyden")


def residuals(f, x: torch.Tensor) -> tuple[float, float]:
    """(abs, rel) residual over the whole batch, as the solvers define it."""
    fx = f(x)
    abs_res = torch.linalg.vector_norm(fx - x).item()
    return abs_res, abs_res / (torch.linalg.vector_norm(fx).item() + 1e-12)


def contraction(n: int = 8, bsz: int = 3, lipschitz: float = 0.8, seed: int = 0):
    """F(h) = tanh(h W + u) with ||W||_2 = ``lipschitz`` < 1: a contraction in h."""
    g = torch.Generator().manual_seed(seed)
    W = spectral_normalize(torch.randn(n, n, generator=g, dtype=DTYPE), lipschitz)
    u = torch.randn(bsz, n, generator=g, dtype=DTYPE)
    return (lambda h: torch.tanh(h @ W + u)), torch.zeros(bsz, n, dtype=DTYPE)


def no_fixed_point(bsz: int = 2, n: int = 5, seed: int = 0):
    """F(h) = h + 1 + sin(h)/2: F(h) - h >= 1/2 everywhere, so no solver can converge.

    Residuals go up and down along any iteration, so the last iterate is
    (in the cases used here) not the best one.
    """
    g = torch.Generator().manual_seed(seed)
    return (lambda h: h + 1.0 + 0.5 * torch.sin(h)), 0.1 * torch.randn(bsz, n, generator=g,
                                                                        dtype=DTYPE)


class NaNAfter:
    """Wraps F; returns NaN (or Inf) from the (n+1)-th call on."""

    def __init__(self, f, n: int, value: float = math.nan):
        self.f, self.n, self.value, self.calls = f, n, value, 0

    def __call__(self, h):
        self.calls += 1
        out = self.f(h)
        return torch.full_like(out, self.value) if self.calls > self.n else out


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_three_solvers():
    assert set(SOLVER_NAMES) <= set(SOLVERS)
    for name in SOLVER_NAMES:
        assert get_solver(name) is SOLVERS[name]


def test_unknown_solver_name_raises_listing_valid_names():
    with pytest.raises(ValueError) as err:
        get_solver("newton")
    for name in SOLVER_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError) as err:
        SolverConfig(name="newton")
    for name in SOLVER_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(stop_mode="max"), dict(max_iter=-1)])
def test_invalid_solver_config_raises(kwargs):
    with pytest.raises(ValueError):
        SolverConfig(**kwargs)


def test_solve_dispatches_by_name():
    f, x0 = contraction()
    x, stats = solve(f, x0, SolverConfig("anderson", 60, 1e-10, "abs"))
    assert isinstance(stats, SolverStats) and stats.converged
    assert residuals(f, x)[0] <= 1e-10


# --------------------------------------------------------------------------- contraction


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_reaches_tolerance_on_a_contraction(name, stop_mode):
    f, x0 = contraction()
    tol = 1e-10
    x, stats = get_solver(name)(f, x0, 200, tol, stop_mode)
    assert stats.converged and not stats.diverged
    assert stats.reason == ""
    abs_res, rel_res = residuals(f, x)
    achieved = abs_res if stop_mode == "abs" else rel_res
    assert achieved <= tol
    # The stats describe the returned iterate.
    assert stats.abs_residual == pytest.approx(abs_res, rel=1e-6, abs=1e-14)
    assert stats.rel_residual == pytest.approx(rel_res, rel=1e-6, abs=1e-14)
    assert len(stats.abs_trace) == len(stats.rel_trace) == stats.nstep + 1
    # The fixed point is the same whichever solver finds it.
    ref, _ = get_solver("fixed_point")(f, x0, 500, 1e-14, "abs")
    torch.testing.assert_close(x, ref, atol=1e-8, rtol=0)


def test_broyden_solves_a_linear_map_in_few_steps():
    """The docstring example: h = h W + 1 with W = I/2 has h* = 2."""
    W = 0.5 * torch.eye(3, dtype=DTYPE)
    x, stats = get_solver("broyden")(lambda h: h @ W + 1.0, torch.zeros(2, 3, dtype=DTYPE),
                                     20, 1e-10, "abs")
    assert stats.converged and stats.nstep <= 3
    torch.testing.assert_close(x, torch.full((2, 3), 2.0, dtype=DTYPE))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_accepts_any_trailing_shape(name):
    """Solvers flatten per sample: a (B, C, H, W) state works like a (B, n) one."""
    f, x0 = contraction(n=12)
    x_flat, _ = get_solver(name)(f, x0, 100, 1e-10, "abs")
    f4 = lambda h: f(h.reshape(3, 12)).reshape(3, 2, 3, 2)  # noqa: E731
    x4, stats = get_solver(name)(f4, x0.reshape(3, 2, 3, 2), 100, 1e-10, "abs")
    assert stats.converged and x4.shape == (3, 2, 3, 2)
    torch.testing.assert_close(x4.reshape(3, 12), x_flat, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_returns_x0_untouched_when_already_converged(name):
    f, x0 = contraction()
    x_star, _ = get_solver("fixed_point")(f, x0, 500, 1e-14, "abs")
    x, stats = get_solver(name)(f, x_star, 30, 1e-10, "abs")
    assert stats.converged and stats.nstep == 0 and stats.best_step == 0
    assert torch.equal(x, x_star) and x is not x_star


def test_damped_fixed_point_converges_where_plain_iteration_oscillates():
    """F(h) = -1.5 h + 1 (rho 1.5, fixed point 0.4): plain iteration diverges,
    damping beta = 0.5 gives the map h -> -0.25 h + 0.5, a contraction."""
    f = lambda h: -1.5 * h + 1.0  # noqa: E731
    x0 = torch.zeros(2, 4, dtype=DTYPE)
    _, plain = get_solver("fixed_point")(f, x0, 40, 1e-10, "abs")
    assert not plain.converged
    x, damped = get_solver("fixed_point")(f, x0, 40, 1e-10, "abs", damping=0.5)
    assert damped.converged
    torch.testing.assert_close(x, torch.full_like(x0, 0.4), atol=1e-9, rtol=0)


def test_callback_sees_every_recorded_iterate():
    f, x0 = contraction()
    seen = []
    _, stats = get_solver("broyden")(f, x0, 50, 1e-10, "abs",
                                      callback=lambda step, x: seen.append(step))
    assert seen == list(range(stats.nstep + 1))


# --------------------------------------------------------------------------- honest failure


def test_fixed_point_reports_failure_on_a_non_contraction():
    """F(h) = 2h + 1 (rho 2): the iteration runs away from h* = -1."""
    f = lambda h: 2.0 * h + 1.0  # noqa: E731
    x0 = torch.zeros(2, 4, dtype=DTYPE)
    x, stats = get_solver("fixed_point")(f, x0, 25, 1e-8, "abs")
    assert not stats.converged and not stats.diverged
    assert "not met" in stats.reason and "25 steps" in stats.reason
    # Best iterate: x0 itself (the residual doubles each step), not the last one.
    assert stats.best_step == 0
    assert torch.equal(x, x0)
    assert stats.abs_residual == min(stats.abs_trace)


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_a_float32_blow_up_is_a_divergence_not_a_convergence(stop_mode):
    """F(h) = 1.5h + 1 in float32: ||F(h)|| overflows to inf (past ~1.8e19) a step before
    ||F(h) - h|| does, and finite / inf = 0 used to read as converged at |h| ~ 1e19."""
    f = lambda h: 1.5 * h + 1.0  # noqa: E731
    x0 = torch.zeros(2, 4, dtype=torch.float32)
    _, stats = get_solver("fixed_point")(f, x0, 300, 1e-6, stop_mode)
    assert stats.diverged and not stats.converged, stats.reason
    assert "non-finite residual" in stats.reason


def test_bptt_reports_a_float32_blow_up_as_diverged():
    from pipeline.deq.grad import _bptt
    f = lambda h: 1.5 * h + 1.0  # noqa: E731
    _, stats = _bptt(f, torch.zeros(2, 4), SolverConfig("fixed_point", 300, 1e-6, "rel"))
    assert stats.diverged and not stats.converged


@pytest.mark.parametrize("name,max_iter", [("fixed_point", 30), ("anderson", 30),
                                           ("broyden", 15)])
def test_solver_returns_its_best_iterate_not_its_last(name, max_iter):
    """On a problem without a fixed point the residual trace goes up and down;
    the returned x must be the iterate of lowest residual (== min of the trace)."""
    f, x0 = no_fixed_point()
    x, stats = get_solver(name)(f, x0, max_iter, 1e-8, "abs")
    assert not stats.converged and not stats.diverged
    assert stats.reason, "a failed solve must say why"
    assert "not met" in stats.reason
    # The construction does what it should: the last iterate is not the best.
    assert stats.best_step != len(stats.abs_trace) - 1
    assert min(stats.abs_trace) < stats.abs_trace[-1]
    abs_res, _ = residuals(f, x)
    assert abs_res == pytest.approx(min(stats.abs_trace), rel=1e-12)
    assert stats.abs_residual == pytest.approx(min(stats.abs_trace), rel=1e-12)
    assert stats.abs_trace[stats.best_step] == min(stats.abs_trace)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_best_iterate_in_rel_mode(name):
    """The best iterate is chosen by the stop mode's residual.

    (No ``converged`` check here: on this problem the relative residual can be
    met honestly by an iterate that has run off to |h| ~ 1e9.)
    """
    f, x0 = no_fixed_point(seed=1)
    x, stats = get_solver(name)(f, x0, 10, 1e-8, "rel")
    _, rel_res = residuals(f, x)
    assert rel_res == pytest.approx(min(stats.rel_trace), rel=1e-12)
    assert stats.rel_residual == min(stats.rel_trace)


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_non_finite_value_stops_the_solve(name, value):
    f, x0 = contraction(lipschitz=0.95)
    bad = NaNAfter(f, n=4, value=value)
    x, stats = get_solver(name)(bad, x0, 50, 1e-14, "abs")
    assert stats.diverged and not stats.converged
    assert "non-finite" in stats.reason
    assert torch.isfinite(x).all()
    # It stopped at the first bad value instead of running the budget out.
    assert bad.calls == 5
    # The returned iterate is the best finite one seen.
    assert all(math.isfinite(v) for v in stats.abs_trace)
    assert stats.abs_residual == min(stats.abs_trace)
    assert residuals(f, x)[0] == pytest.approx(min(stats.abs_trace), rel=1e-12)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_non_finite_first_evaluation_returns_x0(name):
    x0 = torch.ones(2, 3, dtype=DTYPE)
    x, stats = get_solver(name)(lambda h: h * math.nan, x0, 10, 1e-8, "abs")
    assert stats.diverged and not stats.converged and stats.reason
    assert torch.equal(x, x0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_samples_do_not_mix(name):
    """Each sample's fixed point is its own: solving the batch equals solving each
    sample alone (Broyden and Anderson keep per-sample histories)."""
    f, x0 = contraction(bsz=3)
    x, stats = get_solver(name)(f, x0, 200, 1e-12, "abs")
    assert stats.converged
    for i in range(3):
        fi = lambda h, i=i: f(torch.cat([x[:i], h, x[i + 1:]]))[i:i + 1]  # noqa: E731
        xi, si = get_solver(name)(fi, x0[i:i + 1], 200, 1e-12, "abs")
        assert si.converged
        torch.testing.assert_close(x[i:i + 1], xi, atol=1e-10, rtol=0)


# --- GMRES: the reference's linear solver -----------------------------------------------------

def linear_system(n: int = 40, bsz: int = 4, rho: float = 1.5, seed: int = 0):
    """f(x) = M_b x + c_b per sample, with a spectral radius near ``rho`` > 1: fixed-point
    iteration diverges, while (I - M) stays invertible."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(bsz, n, n, generator=g, dtype=DTYPE) * rho / n ** 0.5
    c = torch.randn(bsz, n, generator=g, dtype=DTYPE)
    exact = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - M, c)
    return (lambda x: torch.einsum("bij,bj->bi", M, x) + c), M, c, exact


def test_gmres_matches_a_dense_solve_where_fixed_point_iteration_diverges():
    f, M, c, exact = linear_system()
    assert torch.linalg.eigvals(M[0]).abs().max() > 1.2  # the case GMRES is here for
    x, stats = solve(f, torch.zeros_like(c), SolverConfig("gmres", 200, 1e-12, restart=60))
    assert stats.converged and stats.reason == ""
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-9)
    assert len(stats.sample_rel_residual) == 4 and max(stats.sample_rel_residual) <= 1e-12
    # the residuals are recomputed from f, not taken from the Arnoldi estimate
    true = torch.linalg.vector_norm(f(x) - x, dim=1) / torch.linalg.vector_norm(c, dim=1)
    torch.testing.assert_close(torch.tensor(stats.sample_rel_residual, dtype=DTYPE), true,
                               rtol=1e-6, atol=1e-14)  # float64 rounding below 1e-14
    _, fp = solve(f, torch.zeros_like(c), SolverConfig("fixed_point", 200, 1e-12))
    assert not fp.converged


def test_gmres_agrees_with_scipy_including_a_stalling_restart():
    """Per sample, the same iterates as scipy.sparse.linalg.gmres: a short restart stalls
    for both (the note in SolverConfig), a long one converges for both."""
    import numpy as np
    import scipy.sparse.linalg as sla
    f, M, c, exact = linear_system(n=60, bsz=2, rho=1.6, seed=3)
    for restart, iters in ((5, 300), (60, 60)):
        x, stats = solve(f, torch.zeros_like(c), SolverConfig("gmres", iters, 1e-10, restart=restart))
        for b in range(2):
            A = (torch.eye(60, dtype=DTYPE) - M[b]).numpy()
            ref, _ = sla.gmres(A, c[b].numpy(), rtol=1e-10, atol=0, restart=restart,
                               maxiter=iters // restart)
            ref_res = np.linalg.norm(c[b].numpy() - A @ ref) / np.linalg.norm(c[b].numpy())
            ours = stats.sample_rel_residual[b]
            if restart == 5:
                assert ours > 1e-3 and ref_res > 1e-3, (ours, ref_res)  # both stall
                assert ours == pytest.approx(ref_res, rel=0.05)
            else:
                assert ours <= 1e-10 and ref_res <= 1e-9
                np.testing.assert_allclose(x[b].numpy(), ref, rtol=0, atol=1e-8)
        assert stats.converged == (restart == 60)


def test_gmres_stops_per_sample_and_counts_its_steps():
    """A sample that is solved at the start (c = 0) costs nothing and does not stop the rest."""
    f, M, c, exact = linear_system(n=20, bsz=3)
    c[1] = 0.0
    g = lambda x: torch.einsum("bij,bj->bi", M, x) + c  # noqa: E731
    x, stats = solve(g, torch.zeros_like(c), SolverConfig("gmres", 100, 1e-11, restart=40))
    assert stats.converged and stats.nstep <= 20  # a 20-dim system: at most 20 Arnoldi steps
    assert x[1].abs().max() == 0.0
    assert stats.sample_rel_residual[1] == 0.0
    x, stats = solve(g, torch.zeros_like(c), SolverConfig("gmres", 3, 1e-11, restart=40))
    assert not stats.converged and stats.nstep == 3 and "not met by every sample" in stats.reason


def test_gmres_as_the_implicit_backward_equals_the_dense_solve_on_mdeq_tiny():
    """The reference's backward on MDEQ-Tiny at digits size (1,920 unknowns a sample) in
    float64, against ``exact`` (dense Jacobian, LU solve), at an untrained model's h* where
    rho(dF/dh) > 1."""
    from pipeline.deq import EstimatorConfig, attach_estimator, jacobian_spectral_radius
    from pipeline.models.mdeq import MDEQ, MDEQConfig
    torch.manual_seed(0)
    model = MDEQ(MDEQConfig(in_channels=1, image_size=8, dropout=0.0)).double()
    x = torch.randn(2, 1, 8, 8, dtype=DTYPE)
    func, h0, shapes = model.problem(x)
    h_star, _ = solve(func, h0, SolverConfig("broyden", 22, 1e-3))
    assert jacobian_spectral_radius(func, h_star, iters=60).max() > 1.0
    target = torch.randn_like(h_star)
    grads = {}
    for name, est in (("exact", EstimatorConfig("exact")),
                      ("gmres", EstimatorConfig("implicit", b_solver="gmres", b_max_iter=1000,
                                                b_tol=1e-13, b_restart=400))):
        stats: list = []
        h = attach_estimator(func, h_star, est, stats)
        grads[name] = torch.autograd.grad((h * target).sum(), list(model.cell.parameters()))
        if name == "gmres":
            assert len(stats) == 1 and stats[0].converged, stats[0].reason
    # GMRES's solution error is at most cond(I - J^T) times its residual (1e-13)
    for a, b in zip(grads["gmres"], grads["exact"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
