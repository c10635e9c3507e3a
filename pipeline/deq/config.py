"""The configurations of the maths, and the names they may hold: no torch here.

params.yaml is validated against these (``pipeline.config``) in the Snakefile's own
process, before any job, so this module imports nothing heavier than ``dataclasses``:
Snakemake starts without paying for torch. The solvers (:mod:`.solvers`), estimators
(:mod:`.grad`) and the Jacobian penalty (:mod:`.jacobian`) take these configurations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STOP_MODES = ("abs", "rel", "inf")
SOLVER_NAMES = ("fixed_point", "anderson", "broyden", "gmres")  # :data:`.solvers.SOLVERS`
LINEAR_SOLVERS = ("gmres",)  # for affine maps only: never a forward solver


ESTIMATORS = ("implicit", "exact", "upg", "npg", "jfb", "bptt", "unrolled")


@dataclass(frozen=True)
class SolverConfig:
    """A solver chosen by name, with its budget.

    Args:
        name: one of ``SOLVER_NAMES`` (``fixed_point``, ``anderson``, ``broyden``; ``gmres``
            for linear systems only, see :func:`gmres`).
        max_iter: cap on iterations (MDEQ's f_thres / b_thres).
        tol: residual tolerance.
        stop_mode: ``rel`` (||F(h)-h|| / ||F(h)||), ``abs`` (||F(h)-h||) or ``inf``
            (max |F(h)-h|, IGNN's stop; not for ``gmres``).
        damping: fixed-point damping beta in h <- (1-beta) h + beta F(h); Anderson's beta.
        memory: Anderson's history size m.
        restart: GMRES's Krylov subspace size before a restart. Small values stall
            when rho(dF/dh) nears 1: on an untrained MDEQ-Tiny digits sample
            (rho ~ 1.7) GMRES(20) and GMRES(50) stall at residuals 0.48 and 0.31
            after 2,000 iterations, GMRES(200) converges in 187.
        check_every: test the tolerance on the host every this many steps (1: every step,
            the stop of the first step that meets it); 0: never, a fixed budget of
            ``max_iter`` steps that returns the best iterate and says whether it met the
            tolerance. Every host read is a GPU sync (module docstring); ``gmres``, a
            float64 reference, ignores it.
        graph: on a CUDA device, capture one call of F as a CUDA graph and replay it at
            every step (:func:`cuda_graphed`); F eagerly on the CPU or where capture fails.
    """

    name: str = "broyden"
    max_iter: int = 30
    tol: float = 1e-5
    stop_mode: str = "rel"
    damping: float = 1.0
    memory: int = 5
    restart: int = 200
    check_every: int = 1
    graph: bool = False

    def __post_init__(self) -> None:
        if self.name not in SOLVER_NAMES:
            raise ValueError(f"unknown solver {self.name!r}; valid names: {sorted(SOLVER_NAMES)}")
        if not isinstance(self.check_every, int) or self.check_every < 0:
            raise ValueError(f"check_every={self.check_every!r} must be an integer >= 0")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode={self.stop_mode!r}; expected one of {STOP_MODES}")
        if self.max_iter < 0:
            raise ValueError(f"max_iter={self.max_iter} must be >= 0")
        if self.restart < 1:
            raise ValueError(f"restart={self.restart} must be >= 1")
        if self.stop_mode == "inf" and self.name in LINEAR_SOLVERS:
            raise ValueError(f"stop_mode='inf' is not available for {self.name!r}; use 'rel' "
                             "or 'abs'")


@dataclass(frozen=True)
class EstimatorConfig:
    """A gradient estimator, by name and explicit fields.

    Args:
        name: one of ``ESTIMATORS``.
        k: unrolling steps (``upg``), Neumann terms (``npg``), layers (``unrolled``).
            Paper's recommended A_{5,0.5} for MDEQ on CIFAR-10.
        lam: damping factor lambda in (0, 1].
        b_solver: backward solver for ``implicit`` (``fixed_point``, ``anderson``, ``broyden``).
        b_max_iter: backward budget b_thres (MDEQ-Tiny: 24).
        b_tol: backward tolerance.
        b_stop_mode: ``rel``, ``abs`` or ``inf`` (max |g_new - g|, IGNN's backward stop).
        b_restart: Krylov subspace size of a ``gmres`` backward.
        b_check_every: how often the backward solve tests its tolerance on the host
            (:class:`~pipeline.deq.solvers.SolverConfig`'s ``check_every``; 0: a fixed budget).
        eval_unroll: at evaluation (no autograd), this many damped steps
            h <- (1-lam) h + lam F(h) after the solve (appendix §2's test-time unrolling;
            0, the default, returns h* as solved).
    """

    name: str = "implicit"
    k: int = 5
    lam: float = 0.5
    b_solver: str = "broyden"
    b_max_iter: int = 24
    b_tol: float = 1e-6
    b_stop_mode: str = "rel"
    b_restart: int = 200
    b_check_every: int = 1
    eval_unroll: int = 0

    def __post_init__(self) -> None:
        if self.name not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.name!r}; valid names: {list(ESTIMATORS)}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"estimator k={self.k!r} must be an integer >= 1")
        if not 0.0 < self.lam <= 1.0:
            raise ValueError(f"estimator lam={self.lam} must be in (0, 1]")
        if not isinstance(self.eval_unroll, int) or self.eval_unroll < 0:
            raise ValueError(f"estimator eval_unroll={self.eval_unroll!r} must be an integer >= 0")
        self.backward_solver  # validates b_solver

    @property
    def backward_solver(self) -> SolverConfig:
        return SolverConfig(self.b_solver, self.b_max_iter, self.b_tol, self.b_stop_mode,
                            restart=self.b_restart, check_every=self.b_check_every)

    @property
    def effective(self) -> "EstimatorConfig":
        """``jfb`` is ``upg`` with k = 1, lam = 1."""
        if self.name == "jfb":
            return EstimatorConfig("upg", 1, 1.0, self.b_solver, self.b_max_iter, self.b_tol,
                                   self.b_stop_mode, self.b_restart, self.b_check_every,
                                   self.eval_unroll)
        return self


PHANTOMS = ("upg", "npg")


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
        import torch  # here, not at the top: params.yaml's validation runs without torch
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def vector_generator(self, step: int) -> torch.Generator:
        """The Hutchinson vectors of step ``step``: ``generator``'s stream 7,919 x 1,000,003
        steps on, apart from the application draws."""
        return self.generator(step + 7_919 * 1_000_003)

    def applies(self, step: int, pretraining: bool) -> bool:
        """Whether training step ``step`` adds the penalty: never in pretraining, else with
        probability ``freq`` (seeded by the step)."""
        if pretraining or not self.enabled or self.freq == 0.0:
            return False
        import torch
        return bool(torch.rand((), generator=self.generator(step)).item() < self.freq)
