"""Host syncs of the solvers and estimators, counted on the CPU.

On a GPU, every read of a device value by the host waits for the queued kernels: a solve
that reads its residual every step launches its kernels one step at a time and leaves the
GPU idle between them. :class:`SyncCounter` counts what would be such a read on CUDA:
``aten._local_scalar_dense`` (``.item()``, ``bool(tensor)``), the ops that sync without it
(``_linalg_check_errors`` behind ``torch.linalg.solve``, ``nonzero``, ``is_nonzero``), and
the Python-level reads ``tolist`` / ``numpy`` / ``cpu`` (a device-to-host copy on CUDA,
invisible to a dispatch mode on the CPU).

On the CPU the solvers keep their books in Python floats (``HOST_BOOKKEEPING_ON_CPU``):
there a host read costs nothing. These tests count the path a GPU runs, so they turn it
off; the last tests check that both paths give the same solves, bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.deq import EstimatorConfig, SolverConfig, implicit_layer, solve

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def device_bookkeeping(monkeypatch):
    """The solvers' device-side bookkeeping, the path a GPU runs, on the CPU."""
    from pipeline.deq import solvers
    monkeypatch.setattr(solvers, "HOST_BOOKKEEPING_ON_CPU", False)
SYNC_OPS = {aten._local_scalar_dense, aten._linalg_check_errors, aten.nonzero, aten.is_nonzero}
SYNC_METHODS = {"tolist", "numpy", "cpu"}


class _Dispatch(TorchDispatchMode):
    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS:
            self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """``with SyncCounter() as syncs:`` ... ``len(syncs)``: the host reads in the block."""

    def __enter__(self) -> list:
        self.seen: list[str] = []
        self._modes = [_Function(self.seen), _Dispatch(self.seen)]
        for mode in self._modes:
            mode.__enter__()
        return self.seen

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def _problem(bsz: int = 4, n: int = 64, seed: int = 0):
    """A contractive tanh layer F(h) = tanh(h W + u), samples independent."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=gen)
    W = torch.nn.Parameter(0.9 * W / torch.linalg.matrix_norm(W, ord=2))
    u = torch.randn(bsz, n, generator=gen)
    return W, u, (lambda h: torch.tanh(h @ W + u)), torch.zeros(bsz, n)


FORWARD = ("broyden", "anderson", "fixed_point")


@pytest.mark.parametrize("name", FORWARD)
def test_a_fixed_budget_solve_reads_the_host_once(name):
    _, _, f, h0 = _problem()
    with SyncCounter() as syncs:
        _, stats = solve(f, h0, SolverConfig(name, 18, 1e-12, check_every=0))
    assert len(syncs) <= 2, syncs
    assert stats.nstep == 18 and len(stats.rel_trace) == 19 and not stats.converged


@pytest.mark.parametrize("name", FORWARD)
def test_a_checked_solve_reads_the_host_once_per_check(name):
    _, _, f, h0 = _problem()
    with SyncCounter() as every:
        _, one = solve(f, h0, SolverConfig(name, 18, 1e-12, check_every=1))
    with SyncCounter() as fifth:
        _, five = solve(f, h0, SolverConfig(name, 18, 1e-12, check_every=5))
    assert len(every) == 18 + 1 + 1  # steps 0..18, then the final read
    assert len(fifth) == math.ceil(19 / 5) + 1
    assert one.rel_trace == five.rel_trace  # the same iterates, read less often


@pytest.mark.parametrize("name", FORWARD)
def test_checking_less_often_returns_the_same_solve_when_the_tolerance_binds_late(name):
    """check_every=1 stops at the first step that meets the tolerance; a fixed budget runs
    every step and returns the best iterate: the same iterate when the tolerance is met
    only at the last step, and the same traces up to the stop otherwise."""
    _, _, f, h0 = _problem()
    x1, s1 = solve(f, h0, SolverConfig(name, 30, 1e-4, check_every=1))
    x0, s0 = solve(f, h0, SolverConfig(name, 30, 1e-4, check_every=0))
    assert s1.converged and s0.converged
    assert s0.rel_trace[:len(s1.rel_trace)] == s1.rel_trace
    assert s0.rel_residual <= s1.rel_residual and s0.nstep == 30
    assert torch.isfinite(x0).all() and torch.isfinite(x1).all()


def test_the_device_residuals_are_the_host_formula():
    """The tracker's float64 residuals equal residuals() on the host, bit for bit."""
    from pipeline.deq.solvers import residuals
    _, _, f, h0 = _problem()
    seen = []
    _, stats = solve(f, h0, SolverConfig("broyden", 8, 1e-12),
                     callback=lambda step, x: seen.append(x.clone()))
    for step, x in enumerate(seen):
        abs_res, rel_res, _ = residuals(x, f(x), False)
        assert (stats.abs_trace[step], stats.rel_trace[step]) == (abs_res, rel_res), step


@pytest.mark.parametrize("check_every", [1, 0])
def test_a_non_finite_step_is_still_a_divergence_named_by_its_step(check_every):
    _, _, f, h0 = _problem()
    calls = []

    def blows_up(h):
        calls.append(1)
        return f(h) * (math.nan if len(calls) > 4 else 1.0)

    x, stats = solve(blows_up, h0, SolverConfig("broyden", 12, 1e-12, check_every=check_every))
    assert stats.diverged and stats.reason == "non-finite residual at step 4", stats.reason
    assert stats.nstep == 3 and len(stats.rel_trace) == 4 and torch.isfinite(x).all()
    assert len(calls) == (5 if check_every else 13)  # unchecked, the budget runs out


def test_the_implicit_backward_with_a_fixed_budget_reads_the_host_once():
    W, _, f, h0 = _problem()
    est = EstimatorConfig("implicit", b_solver="broyden", b_max_iter=20, b_tol=1e-12,
                          b_check_every=0)
    h, _ = implicit_layer(f, h0, SolverConfig("broyden", 20, 1e-12, check_every=0), est)
    loss = h.square().sum()
    with SyncCounter() as syncs:
        loss.backward()
    assert len(syncs) <= 2, syncs
    assert W.grad is not None and torch.isfinite(W.grad).all()


@pytest.mark.parametrize("name", ["upg", "npg", "jfb"])
def test_the_phantom_estimators_never_read_the_host(name):
    W, _, f, h0 = _problem()
    h, _ = implicit_layer(f, h0, SolverConfig("broyden", 20, 1e-12, check_every=0),
                          EstimatorConfig(name, k=5, lam=0.5))
    loss = h.square().sum()
    with SyncCounter() as syncs:
        loss.backward()
    assert syncs == []
    assert W.grad is not None


def _solve_both_ways(monkeypatch, *args, **kwargs):
    from pipeline.deq import solvers
    out = []
    for on_host in (False, True):
        monkeypatch.setattr(solvers, "HOST_BOOKKEEPING_ON_CPU", on_host)
        out.append(solve(*args, **kwargs))
    return out


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("check_every,tol,stop_mode", [(1, 1e-4, "rel"), (0, 1e-4, "rel"),
                                                       (3, 1e-12, "abs"), (1, 1e-3, "inf"),
                                                       (4, 1e-3, "inf")])
def test_host_and_device_bookkeeping_give_the_same_solve(monkeypatch, name, check_every, tol,
                                                          stop_mode):
    """The CPU's Python-float books and the device's: the same iterate, traces, best step,
    stop and reason, bit for bit."""
    _, _, f, h0 = _problem()
    (x_dev, s_dev), (x_host, s_host) = _solve_both_ways(
        monkeypatch, f, h0, SolverConfig(name, 25, tol, stop_mode=stop_mode,
                                         check_every=check_every))
    assert torch.equal(x_dev, x_host)
    assert s_dev == s_host, (s_dev, s_host)


@pytest.mark.parametrize("check_every", [1, 0, 3])
def test_host_and_device_bookkeeping_diverge_alike(monkeypatch, check_every):
    _, _, f, h0 = _problem()

    def blows_up_after(n):
        calls = []

        def g(h):
            calls.append(1)
            return f(h) * (math.inf if len(calls) > n else 1.0)
        return g

    out = []
    from pipeline.deq import solvers
    for on_host in (False, True):
        monkeypatch.setattr(solvers, "HOST_BOOKKEEPING_ON_CPU", on_host)
        out.append(solve(blows_up_after(5), h0, SolverConfig("broyden", 12, 1e-12,
                                                              check_every=check_every)))
    (x_dev, s_dev), (x_host, s_host) = out
    assert s_dev.diverged and s_dev.reason == "non-finite residual at step 5"
    assert torch.equal(x_dev, x_host) and s_dev == s_host


def test_the_counter_sees_the_reads_it_is_meant_to():
    x = torch.ones(3)
    with SyncCounter() as syncs:
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
        torch.linalg.solve(torch.eye(2), torch.ones(2))
        torch.nonzero(x)
    assert len(syncs) == 5, syncs


def test_a_graphed_solve_falls_back_to_eager_f_on_the_cpu():
    _, _, f, h0 = _problem()
    x_eager, s_eager = solve(f, h0, SolverConfig("broyden", 10, 1e-12))
    x_graph, s_graph = solve(f, h0, SolverConfig("broyden", 10, 1e-12, graph=True))
    assert torch.equal(x_eager, x_graph) and s_eager.rel_trace == s_graph.rel_trace


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_fixed_budget_solve_syncs_only_at_its_end_and_a_graph_is_the_same_map():
    """The solve under CUDA's sync debug mode (warn: each sync is a warning), with F eager
    and from a CUDA graph: at most 2 syncs, and the same iterates to float tolerance."""
    import warnings

    from pipeline.models.mdeq import MDEQ, MDEQConfig
    torch.manual_seed(0)
    config = MDEQConfig.from_params({"preset": "tiny"}, in_channels=3, num_classes=10,
                                    image_size=32)
    model = MDEQ(config).cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    results = {}
    with torch.no_grad():
        func, h0 = model.deq_problem(x)
        for graph in (False, True):
            cfg = SolverConfig("broyden", 12, 1e-12, check_every=0, graph=graph)
            solve(func, h0, cfg)  # warm-up: lazy initialisations, the graph's own capture
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    results[graph] = solve(func, h0, cfg)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= 2 + 2 * graph, syncs  # a capture's warm-up and end wait too
    (xe, se), (xg, sg) = results[False], results[True]
    torch.testing.assert_close(xg, xe, rtol=1e-4, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(se.rel_trace, sg.rel_trace)) < 1e-4
