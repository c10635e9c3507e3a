"""Tests for the gradient estimators in ``pipeline.deq.grad``.

The reference is the exact implicit gradient (paper Eq. 4), built from the
dense Jacobian (``exact``), itself checked by ``torch.autograd.gradcheck``.
Against it:

* ``implicit`` with a tight backward tolerance matches to 1e-6;
* ``upg`` (appendix Alg. 1) and ``npg`` (Alg. 2/3) converge to it as k grows
  (Theorem 2), agree with each other at an exact fixed point, and at k = 1
  point the same way whatever lambda is;
* every estimator gives every parameter a non-zero gradient, and eval mode
  builds no graph.

The model is F(h) = tanh(h W + u U + b) with ||W||_2 = 0.6 (a contraction),
float64, a batch of 3 and 6 hidden units: every test runs in well under a second.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.deq import (ESTIMATORS, EstimatorConfig, SolverConfig, attach_estimator,
                          attach_phantom, implicit_layer, solve, spectral_normalize)
from pipeline.deq.grad import unroll

DTYPE = torch.float64
TIGHT = SolverConfig("broyden", 100, 1e-13, "abs")  # forward solve to machine precision
B, N, D = 3, 6, 4


class Model(torch.nn.Module):
    """F(h; u) = tanh(h W + u U + b); a contraction in h since ||W||_2 < 1."""

    def __init__(self, lipschitz: float = 0.6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = spectral_normalize(torch.randn(N, N, generator=g, dtype=DTYPE), lipschitz)
        self.W = torch.nn.Parameter(W)
        self.U = torch.nn.Parameter(torch.randn(D, N, generator=g, dtype=DTYPE) / D ** 0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(N, generator=g, dtype=DTYPE))

    def func(self, u: torch.Tensor):
        inj = u @ self.U + self.b  # input injection, computed once per call
        return lambda h: torch.tanh(h @ self.W + inj)


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, D, generator=g, dtype=DTYPE)
    y = torch.randn(B, N, generator=g, dtype=DTYPE)
    return u, y


def grads(model: Model, est: EstimatorConfig, solver: SolverConfig = TIGHT, seed: int = 1):
    """Flat gradient of an MSE loss wrt (W, U, b, u) under ``est``."""
    u, y = data(seed)
    u.requires_grad_()
    model.zero_grad(set_to_none=True)
    h, _ = implicit_layer(model.func(u), torch.zeros(B, N, dtype=DTYPE), solver, est)
    ((h - y) ** 2).sum().backward()
    return torch.cat([model.W.grad.flatten(), model.U.grad.flatten(), model.b.grad.flatten(),
                      u.grad.flatten()])


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.fixture(scope="module")
def model():
    return Model()


@pytest.fixture(scope="module")
def g_exact(model):
    return grads(model, EstimatorConfig("exact"))


# --------------------------------------------------------------------------- config


def test_estimator_names():
    assert set(ESTIMATORS) == {"implicit", "exact", "upg", "npg", "jfb", "bptt", "unrolled"}


def test_unknown_estimator_name_raises_listing_valid_names():
    with pytest.raises(ValueError) as err:
        EstimatorConfig("phantom")
    for name in ESTIMATORS:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs", [
    dict(k=0), dict(k=-3), dict(lam=0.0), dict(lam=-0.5), dict(lam=1.5), dict(lam=float("nan")),
    dict(b_solver="newton"), dict(b_stop_mode="max"), dict(b_max_iter=-1),
])
def test_invalid_estimator_fields_raise(kwargs):
    with pytest.raises(ValueError):
        EstimatorConfig("upg", **kwargs)


def test_non_integer_k_is_rejected_at_construction():
    """k counts steps; k = 2.5 must not be accepted and fail later inside range()."""
    with pytest.raises((ValueError, TypeError)):
        EstimatorConfig("upg", k=2.5)


def test_jfb_is_upg_with_one_undamped_step():
    eff = EstimatorConfig("jfb", k=7, lam=0.3).effective
    assert (eff.name, eff.k, eff.lam) == ("upg", 1, 1.0)
    assert EstimatorConfig("npg", k=7, lam=0.3).effective == EstimatorConfig("npg", k=7, lam=0.3)


# --------------------------------------------------------------------------- exact / implicit


def test_exact_passes_gradcheck():
    """The exact gradient wrt the input injection u and the weight W, by finite differences."""
    model = Model()
    u, _ = data()
    u = u[:2].clone().requires_grad_()
    W = model.W.detach().clone().requires_grad_()
    inj_b = model.b.detach()
    U = model.U.detach()

    def layer(u, W):
        f = lambda h: torch.tanh(h @ W + u @ U + inj_b)  # noqa: E731
        h, stats = implicit_layer(f, torch.zeros(u.shape[0], N, dtype=DTYPE), TIGHT,
                                  EstimatorConfig("exact"))
        assert stats.converged
        return h

    assert torch.autograd.gradcheck(layer, (u, W), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_exact_matches_the_closed_form(model):
    """g = (I - J^T)^{-1} dL/dh, with J = diag(1 - h*^2) W^T per sample, by hand."""
    u, y = data()
    f = model.func(u)
    with torch.no_grad():
        h_star, _ = implicit_layer(f, torch.zeros(B, N, dtype=DTYPE), TIGHT,
                                   EstimatorConfig("exact"), training=False)
    dLdh = 2 * (h_star - y)
    dgrad_b = []
    for i in range(B):
        J = torch.diag(1 - h_star[i] ** 2) @ model.W.detach().T  # dF_j/dh_k
        g = torch.linalg.solve(torch.eye(N, dtype=DTYPE) - J.T, dLdh[i])
        dgrad_b.append((1 - h_star[i] ** 2) * g)  # dL/db contribution of sample i
    expected_b = torch.stack(dgrad_b).sum(0)
    model.zero_grad(set_to_none=True)
    h, _ = implicit_layer(f, torch.zeros(B, N, dtype=DTYPE), TIGHT, EstimatorConfig("exact"))
    ((h - y) ** 2).sum().backward()
    torch.testing.assert_close(model.b.grad, expected_b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("b_solver", ["broyden", "anderson", "fixed_point"])
def test_implicit_matches_exact(model, g_exact, b_solver):
    est = EstimatorConfig("implicit", b_solver=b_solver, b_max_iter=200, b_tol=1e-13,
                          b_stop_mode="abs")
    g = grads(model, est)
    torch.testing.assert_close(g, g_exact, atol=1e-6, rtol=0)
    assert rel_err(g, g_exact) < 1e-8


def test_implicit_reports_its_backward_solve(model):
    u, y = data()
    est = EstimatorConfig("implicit", b_max_iter=50, b_tol=1e-12, b_stop_mode="abs")
    stats_out: list = []
    h, _ = implicit_layer(model.func(u), torch.zeros(B, N, dtype=DTYPE), TIGHT, est,
                          backward_stats=stats_out)
    assert stats_out == []  # nothing solved before backward
    ((h - y) ** 2).sum().backward()
    assert len(stats_out) == 1 and stats_out[0].converged


def test_loose_implicit_is_only_approximate(model, g_exact):
    """A 2-step backward solve is not the exact gradient: the test above is not vacuous."""
    g = grads(model, EstimatorConfig("implicit", b_solver="fixed_point", b_max_iter=2))
    assert rel_err(g, g_exact) > 1e-3


# --------------------------------------------------------------------------- phantom gradients


@pytest.mark.parametrize("lam", [0.5, 1.0])
@pytest.mark.parametrize("name", ["upg", "npg"])
def test_phantom_gradient_converges_to_exact_as_k_grows(model, g_exact, name, lam):
    """Theorem 2: A_{k,lam} -> exact as k -> inf on a contraction."""
    ks = [1, 2, 5, 10, 20, 40, 80]
    errs = [rel_err(grads(model, EstimatorConfig(name, k=k, lam=lam)), g_exact) for k in ks]
    assert errs[0] > 1e-2  # k = 1 is a poor estimate: the test has something to show
    for a, b in zip(errs, errs[1:]):
        assert b <= a * 1.05 + 1e-12, f"error rose with k: {errs}"
    assert errs[-1] < 1e-4, errs
    # Theorem 2: the error is O(q^k) with q = ||B||, B = lam dF/dh + (1 - lam) I, so
    # q <= lam * 0.6 + (1 - lam): 0.8 at lam = 0.5, 0.6 at lam = 1. From k = 10 to 40 it
    # must fall at least by q^30 (x 2 for the transient), i.e. by 1e-3 or 2e-7.
    q = lam * 0.6 + (1 - lam)
    assert errs[5] <= 2 * q ** (ks[5] - ks[3]) * errs[3], (errs, q)


@pytest.mark.parametrize("k", [1, 2, 5, 13])
@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0])
def test_upg_equals_npg_at_an_exact_fixed_point(model, k, lam):
    g_upg = grads(model, EstimatorConfig("upg", k=k, lam=lam))
    g_npg = grads(model, EstimatorConfig("npg", k=k, lam=lam))
    torch.testing.assert_close(g_upg, g_npg, atol=1e-10, rtol=0)


def test_upg_differs_from_npg_away_from_the_fixed_point(model):
    """With a 2-step forward solve, UPG's unroll moves h and the two estimates part."""
    loose = SolverConfig("fixed_point", 2, 1e-12, "abs")
    g_upg = grads(model, EstimatorConfig("upg", k=5, lam=0.5), solver=loose)
    g_npg = grads(model, EstimatorConfig("npg", k=5, lam=0.5), solver=loose)
    assert (g_upg - g_npg).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["upg", "npg"])
def test_k1_direction_does_not_depend_on_lambda(model, g_exact, name):
    """A_{1,lam} = lam * dF/dtheta^T dL/dh: lambda only rescales it."""
    g1 = grads(model, EstimatorConfig(name, k=1, lam=1.0))
    cosines = []
    for lam in (0.1, 0.5, 0.9, 1.0):
        g = grads(model, EstimatorConfig(name, k=1, lam=lam))
        torch.testing.assert_close(g, lam * g1, atol=1e-12, rtol=1e-10)
        cosines.append(cosine(g, g_exact))
    assert max(cosines) - min(cosines) < 1e-12
    # ... and it is JFB's direction.
    torch.testing.assert_close(g1, grads(model, EstimatorConfig("jfb")), atol=1e-12, rtol=0)


def test_k2_direction_does_depend_on_lambda(model, g_exact):
    c = [cosine(grads(model, EstimatorConfig("upg", k=2, lam=lam)), g_exact) for lam in (0.2, 1.0)]
    assert abs(c[0] - c[1]) > 1e-4


def test_upg_is_the_damped_unroll_from_h_star(model):
    """Alg. 1 literally: k damped steps under autograd from the no-grad solution."""
    u, y = data()
    f = model.func(u)
    h, _ = implicit_layer(f, torch.zeros(B, N, dtype=DTYPE), TIGHT,
                          EstimatorConfig("upg", k=3, lam=0.7))
    with torch.no_grad():
        h_star, _ = implicit_layer(f, torch.zeros(B, N, dtype=DTYPE), TIGHT,
                                   EstimatorConfig("upg"), training=False)
    ref = h_star
    for _ in range(3):
        ref = (1 - 0.7) * ref + 0.7 * f(ref)
    torch.testing.assert_close(h, ref, atol=0, rtol=0)
    torch.testing.assert_close(unroll(f, h_star, 3, 0.7), ref, atol=0, rtol=0)


# --------------------------------------------------------------------------- every estimator


def estimator_configs():
    return [EstimatorConfig("implicit", b_max_iter=50, b_tol=1e-10),
            EstimatorConfig("exact"),
            EstimatorConfig("upg", k=5, lam=0.5),
            EstimatorConfig("npg", k=5, lam=0.5),
            EstimatorConfig("jfb"),
            EstimatorConfig("bptt"),
            EstimatorConfig("unrolled", k=5)]


@pytest.mark.parametrize("est", estimator_configs(), ids=lambda e: e.name)
def test_every_parameter_gets_a_nonzero_gradient(model, est):
    u, y = data()
    u.requires_grad_()
    model.zero_grad(set_to_none=True)
    solver = SolverConfig("broyden", 40, 1e-10, "abs")
    h, stats = implicit_layer(model.func(u), torch.zeros(B, N, dtype=DTYPE), solver, est)
    assert h.grad_fn is not None
    ((h - y) ** 2).sum().backward()
    for name, p in [*model.named_parameters(), ("u", u)]:
        assert p.grad is not None, f"{est.name}: no gradient for {name}"
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0, f"{est.name}: zero gradient for {name}"


@pytest.mark.parametrize("est", estimator_configs(), ids=lambda e: e.name)
def test_every_estimator_points_downhill(model, g_exact, est):
    """On a contraction, each estimate is an ascent direction of L (Theorem 1)."""
    assert cosine(grads(model, est), g_exact) > 0.5


def test_bptt_matches_exact_when_the_unroll_converges(model, g_exact):
    g = grads(model, EstimatorConfig("bptt"), solver=SolverConfig("fixed_point", 200, 1e-14, "abs"))
    assert rel_err(g, g_exact) < 1e-8


def test_unrolled_is_k_plain_steps_from_h0(model):
    u, _ = data()
    f = model.func(u)
    h0 = torch.zeros(B, N, dtype=DTYPE)
    h, stats = implicit_layer(f, h0, TIGHT, EstimatorConfig("unrolled", k=4, lam=0.3))
    assert stats.nstep == 0 and stats.abs_trace == []
    ref = h0
    for _ in range(4):
        ref = f(ref)
    torch.testing.assert_close(h, ref, atol=0, rtol=0)


# --------------------------------------------------------------------------- eval mode


class CountingFunc:
    """Wraps F and counts the calls made with grad enabled."""

    def __init__(self, f):
        self.f, self.calls, self.grad_calls = f, 0, 0

    def __call__(self, h):
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        return self.f(h)


@pytest.mark.parametrize("est", estimator_configs(), ids=lambda e: e.name)
@pytest.mark.parametrize("mode", ["training_false", "no_grad"])
def test_eval_mode_builds_no_graph(model, est, mode):
    u, _ = data()
    u.requires_grad_()
    f = CountingFunc(model.func(u))
    h0 = torch.zeros(B, N, dtype=DTYPE)
    solver = SolverConfig("broyden", 40, 1e-10, "abs")
    stats_out: list = []
    if mode == "no_grad":
        with torch.no_grad():
            h, _ = implicit_layer(f, h0, solver, est, training=True, backward_stats=stats_out)
    else:
        h, _ = implicit_layer(f, h0, solver, est, training=False, backward_stats=stats_out)
    assert h.grad_fn is None and not h.requires_grad
    assert f.grad_calls == 0, f"{est.name}: F ran with grad enabled in eval mode"
    assert stats_out == []
    if est.name != "unrolled":
        # Eval returns the solver's fixed point.
        with torch.no_grad():
            ref, _ = implicit_layer(model.func(u), h0, solver, est, training=False)
        torch.testing.assert_close(h, ref, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["upg", "npg", "implicit", "exact", "jfb"])
def test_training_forward_value_is_the_fixed_point(model, name):
    """At an exact fixed point every solver-based estimator returns h* itself."""
    u, _ = data()
    f = model.func(u)
    h0 = torch.zeros(B, N, dtype=DTYPE)
    h, _ = implicit_layer(f, h0, TIGHT, EstimatorConfig(name))
    with torch.no_grad():
        h_star, _ = implicit_layer(f, h0, TIGHT, EstimatorConfig(name), training=False)
    torch.testing.assert_close(h.detach(), h_star, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- attach_estimator


@pytest.mark.parametrize("est", [e for e in estimator_configs()
                                 if e.name not in ("bptt", "unrolled")], ids=lambda e: e.name)
def test_attach_estimator_equals_implicit_layer(model, est):
    """Attaching an estimator to a shared h* is what implicit_layer does after its solve."""
    u, y = data()
    with torch.no_grad():
        h_star, _ = solve(model.func(u), torch.zeros(B, N, dtype=DTYPE), TIGHT)

    def flat_grad(h):
        model.zero_grad(set_to_none=True)
        ((h - y) ** 2).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    # A fresh closure per path: each builds (and frees) its own injection graph.
    a = flat_grad(attach_estimator(model.func(u), h_star, est))
    b = flat_grad(implicit_layer(model.func(u), torch.zeros(B, N, dtype=DTYPE), TIGHT, est)[0])
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["upg", "npg"])
def test_a_damping_per_sample_equals_one_run_per_lambda(model, name):
    """Several lam in one batch (a (B * L, 1) tensor, the batch tiled L times) give each
    copy the input gradient its lam gives alone."""
    u, y = data()
    with torch.no_grad():
        h_star, _ = solve(model.func(u), torch.zeros(B, N, dtype=DTYPE), TIGHT)
    lams = (0.3, 0.7, 1.0)
    alone = []
    for lam in lams:
        ul = u.clone().requires_grad_()
        h = attach_estimator(model.func(ul), h_star, EstimatorConfig(name, k=4, lam=lam))
        ((h - y) ** 2).sum().backward()
        alone.append(ul.grad)
    tiled = u.repeat(len(lams), 1).requires_grad_()
    lam = torch.tensor(lams, dtype=DTYPE).repeat_interleave(B).unsqueeze(1)
    h = attach_phantom(model.func(tiled), h_star.repeat(len(lams), 1), name, 4, lam)
    ((h - y.repeat(len(lams), 1)) ** 2).sum().backward()
    torch.testing.assert_close(tiled.grad.reshape(len(lams), B, D), torch.stack(alone),
                               atol=1e-14, rtol=1e-12)
    assert not torch.allclose(alone[0], alone[1])  # the lam do differ


def test_attach_phantom_rejects_other_names(model):
    u, _ = data()
    with pytest.raises(ValueError, match="'implicit'.*upg"):
        attach_phantom(model.func(u), torch.zeros(B, N, dtype=DTYPE), "implicit", 2, 0.5)


@pytest.mark.parametrize("name", ["bptt", "unrolled"])
def test_attach_estimator_rejects_unroll_based_estimators(model, name):
    u, _ = data()
    with pytest.raises(ValueError):
        attach_estimator(model.func(u), torch.zeros(B, N, dtype=DTYPE), EstimatorConfig(name))


@pytest.mark.parametrize("est", [EstimatorConfig("exact"), EstimatorConfig("npg", k=4),
                                 EstimatorConfig("upg", k=4),
                                 EstimatorConfig("implicit", b_max_iter=100, b_tol=1e-13,
                                                 b_stop_mode="abs")], ids=lambda e: e.name)
def test_image_shaped_state_gives_the_flat_gradients(model, est):
    """A (B, 2, 3) state (as a conv DEQ has) gives the gradients of the flat (B, 6) one."""
    u, y = data()
    model.zero_grad(set_to_none=True)
    f = model.func(u)
    h, _ = implicit_layer(lambda z: f(z.reshape(B, N)).reshape(B, 2, 3),
                          torch.zeros(B, 2, 3, dtype=DTYPE), TIGHT, est)
    ((h.reshape(B, N) - y) ** 2).sum().backward()
    g4 = torch.cat([p.grad.flatten() for p in model.parameters()])
    g2 = grads(model, est)[:g4.numel()]
    torch.testing.assert_close(g4, g2, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- layer record


def test_record_and_replay_a_stack_of_implicit_layers(model):
    """Two implicit layers in a row: the record holds each (F, h*); a replay at those h*
    with ``exact`` gives the exact gradient of the stack, and runs no solve."""
    from pipeline.deq import record_layers, replay_layers
    u, y = data()
    second = Model(lipschitz=0.5, seed=7)
    params = [*model.parameters(), *second.parameters()]

    def forward(est):
        h1, _ = implicit_layer(model.func(u), torch.zeros(B, N, dtype=DTYPE), TIGHT, est)
        inner = second.func(torch.zeros(B, D, dtype=DTYPE))
        h2, _ = implicit_layer(lambda h: inner(h) + 0.3 * h1, torch.zeros(B, N, dtype=DTYPE),
                               TIGHT, est)
        return ((h2 - y) ** 2).sum()

    exact = torch.autograd.grad(forward(EstimatorConfig("exact")), params)
    with record_layers() as layers:
        forward(EstimatorConfig("upg", k=2, lam=0.5))
    assert len(layers) == 2 and all(r.stats.converged for r in layers)
    with replay_layers(layers, EstimatorConfig("exact")) as replay:
        replayed = torch.autograd.grad(forward(EstimatorConfig("upg")), params)
    assert replay.index == 2 and len(replay.funcs) == 2
    for a, b in zip(replayed, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the replay used the recorded h*, not a new solve: a wrong h* changes the gradient
    layers[0].h_star = layers[0].h_star + 0.1
    with replay_layers(layers, EstimatorConfig("exact")):
        moved = torch.autograd.grad(forward(EstimatorConfig("upg")), params)
    assert (moved[0] - exact[0]).abs().max() > 1e-4


def test_replay_refuses_a_forward_with_other_layers(model):
    from pipeline.deq import record_layers, replay_layers
    u, _ = data()
    with record_layers() as layers:
        implicit_layer(model.func(u), torch.zeros(B, N, dtype=DTYPE), TIGHT, EstimatorConfig("upg"))
    with pytest.raises(RuntimeError, match="record has 1"):
        with replay_layers(layers, EstimatorConfig("exact")):
            for _ in range(2):
                implicit_layer(model.func(u), torch.zeros(B, N, dtype=DTYPE), TIGHT,
                               EstimatorConfig("upg"))
    with pytest.raises(RuntimeError, match="replay ran 0 implicit layers, the record has 1"):
        with replay_layers(layers, EstimatorConfig("exact")):
            pass


def test_eval_unroll_takes_damped_steps_after_the_solve_at_evaluation_only():
    """Appendix §2's test-time unrolling: at evaluation, eval_unroll damped steps from h*;
    in training the estimator is unchanged."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(0.5 * torch.randn(6, 6) / 6 ** 0.5)
    u = torch.randn(3, 6)
    f = lambda h: torch.tanh(h @ W + u)  # noqa: E731
    solver = SolverConfig("broyden", 4, 1e-12)  # stopped short: the steps move h
    h_star, _ = implicit_layer(f, torch.zeros(3, 6), solver, EstimatorConfig("upg"),
                               training=False)
    est = EstimatorConfig("upg", k=5, lam=0.5, eval_unroll=3)
    h_eval, _ = implicit_layer(f, torch.zeros(3, 6), solver, est, training=False)
    with torch.no_grad():
        assert torch.equal(h_eval, unroll(f, h_star, 3, 0.5))
    assert not torch.equal(h_eval, h_star)
    h_train, _ = implicit_layer(f, torch.zeros(3, 6), solver, est, training=True)
    h_ref, _ = implicit_layer(f, torch.zeros(3, 6), solver, EstimatorConfig("upg", k=5, lam=0.5),
                              training=True)
    assert torch.equal(h_train, h_ref)
    with pytest.raises(ValueError, match="eval_unroll"):
        EstimatorConfig("upg", eval_unroll=-1)
