"""The training loop's configuration: :class:`TrainConfig`, one run of a training study.

A run is a study's ``defaults`` deep-merged with one entry of its ``runs`` (the Snakemake
helper ``study_run`` in ``workflow/rules/common.smk``); :class:`TrainConfig` holds the
loop's keys, the ``task`` name and the task's ``model:`` and ``data:`` blocks, and refuses
combinations that would fail inside a job. ``pipeline.config`` calls
:meth:`TrainConfig.from_params` on every run when it validates params.yaml, before any job,
in the Snakefile's process: this module imports no torch (``tests/test_config.py``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.deq.config import EstimatorConfig, JacobianRegConfig, SolverConfig
from pipeline.experiments.tasks import check_task

if TYPE_CHECKING:
    from pipeline.experiments.diagnostics import DiagnosticsConfig


JR_OFF = {"weight": 0.0, "freq": 0.0, "incr": 0.0, "incr_every": 0, "samples": 1}


@dataclass(frozen=True)
class TrainConfig:
    """The loop's keys, the task, and the task's ``model:`` / ``data:`` blocks.

    The defaults are params.yaml's ``ablations.defaults`` (``tests/test_config.py``
    checks that they agree).
    """

    task: str = "image"
    model: dict = field(default_factory=lambda: {"preset": "tiny", "dropout": 0.25,
                                                 "num_layers": 10})
    data: dict = field(default_factory=lambda: {"dataset": "digits"})
    epochs: int = 3
    max_steps: int | None = None             # cap on all steps; None = epochs x steps/epoch
    max_steps_per_epoch: int | None = None   # cap for smoke tests; None = the whole epoch
    batch_size: int = 32
    eval_batch_size: int = 500
    eval_every: int = 0                      # extra evaluations every N steps; 0 = epoch ends
    seed: int = 0
    device: str = "cpu"
    f_solver: str = "broyden"
    f_max_iter: int = 22                     # MDEQ-Tiny F_THRES
    f_tol: float = 1e-3
    f_stop_mode: str = "rel"                 # rel | abs | inf (IGNN: max |change|)
    b_solver: str = "broyden"
    b_max_iter: int = 24                     # MDEQ-Tiny B_THRES
    b_tol: float = 1e-3
    b_stop_mode: str = "rel"
    f_check_every: int = 1                   # test f_tol on the host every N steps (0: fixed
    b_check_every: int = 1                   # budget); each test is a GPU sync (deq.solvers)
    f_graph: bool = False                    # forward F from a CUDA graph (deq.solvers)
    deterministic: bool = True               # determinism.configure: bitwise resume
    estimator: str = "implicit"
    k: int = 5
    lam: float = 0.5
    pretrain_steps: int = 20                 # MDEQ's unrolled pretraining, weight-tied
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2.5e-6
    schedule: str = "cosine"
    lr_decay_epochs: list = field(default_factory=list)  # schedule multistep: epochs after
    lr_decay_factor: float = 0.5                          # which the lr is multiplied by this
    warmup_steps: int = 0                    # linear warm-up before the schedule
    grad_clip: float | None = None           # max gradient norm; None = no clipping
    checkpoint_every: int = 0                # steps; 0 = epoch ends only
    diagnostics_every: int = 40
    reference_tol: float = 1e-8              # GMRES reference, per sample, float64
    reference_max_iter: int = 1000
    reference_restart: int = 400
    timing_repeats: int = 3
    memory_every: int = 1                    # measure a step's tensor memory every N epochs
                                             # (0: never); the CPU counter slows that step
    power_iters: int = 40
    power_tol: float = 1e-3
    diverge_residual: float = 1e3
    diverge_loss_factor: float | None = 20.0  # loss > factor x early loss: divergence
    diverge_loss_window: int = 10            # early loss: mean of the first N steps
    diverge_capped_epochs: int | None = None  # forward solve at its cap for N+1 epochs in a
                                              # row, residual grown 10x: divergence (None: off)
    nproc_per_node: int = 1                  # ranks: >1 the rule runs the job under torchrun
    test_time_eval: bool = False             # after training: evaluate with 0, k, 2k unrolled
                                             # steps and 1/2x, 2x f_max_iter (test_time.py)
    spectral_batches: int = 0                # after training: rho(dF/dh), rho(dF_lam/dh) on
                                             # this many evaluation batches (0: not measured)
    # Jacobian regularization (pipeline.deq.jacobian): weight, freq, incr, incr_every, samples
    jacobian_reg: dict = field(default_factory=lambda: dict(JR_OFF))
    adaptive_lam_every: int = 0              # lam = 1/rho(dF/dh), clipped to (0, 1], refreshed
                                             # every N estimator steps (0: the fixed lam)

    @classmethod
    def from_params(cls, params: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown run keys {unknown}; valid keys: {sorted(names)}")
        cfg = cls(**params)
        check_task(cfg.task)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Combinations that would fail inside a job (or be silently ignored): refused here,
        where params.yaml is validated, before any job starts."""
        jr = self.jacobian_reg_config  # validates the block
        if self.estimator in ("bptt", "unrolled"):  # no fixed point h* is recorded
            for key, value in (("diagnostics_every", self.diagnostics_every),
                               ("adaptive_lam_every", self.adaptive_lam_every),
                               ("spectral_batches", self.spectral_batches),
                               ("test_time_eval", self.test_time_eval),
                               ("jacobian_reg.weight", jr.weight)):
                if value:
                    raise ValueError(f"{key}: {value} needs the fixed point h*, which estimator "
                                     f"{self.estimator!r} does not record; set it to 0")
        if self.optimizer == "sgd" and self.nesterov and self.momentum <= 0:
            raise ValueError(f"nesterov: true needs momentum > 0, not {self.momentum}")
        if self.lr_decay_epochs and self.schedule != "multistep":
            raise ValueError(f"lr_decay_epochs: {self.lr_decay_epochs} is used by schedule "
                             f"multistep only, not {self.schedule!r}")
        self.forward_solver, self.estimator_config  # SolverConfig's own checks

    @property
    def jacobian_reg_config(self) -> JacobianRegConfig:
        unknown = sorted(set(self.jacobian_reg) - set(JR_OFF))
        if unknown:
            raise ValueError(f"unknown jacobian_reg keys {unknown}; valid keys: {sorted(JR_OFF)}")
        return JacobianRegConfig(**{**JR_OFF, **self.jacobian_reg}, seed=self.seed)

    @property
    def forward_solver(self) -> SolverConfig:
        return SolverConfig(self.f_solver, self.f_max_iter, self.f_tol, self.f_stop_mode,
                            check_every=self.f_check_every, graph=self.f_graph)

    @property
    def estimator_config(self) -> EstimatorConfig:
        return EstimatorConfig(self.estimator, self.k, self.lam, self.b_solver, self.b_max_iter,
                               self.b_tol, self.b_stop_mode, b_check_every=self.b_check_every)

    @property
    def diagnostics_config(self) -> DiagnosticsConfig:
        from pipeline.experiments.diagnostics import DiagnosticsConfig  # torch: not at validation
        return DiagnosticsConfig(
            forward_solver=self.forward_solver, estimator=self.estimator_config,
            implicit=EstimatorConfig("implicit", b_solver=self.b_solver,
                                     b_max_iter=self.b_max_iter, b_tol=self.b_tol,
                                     b_stop_mode=self.b_stop_mode,
                                     b_check_every=self.b_check_every),
            reference=EstimatorConfig("implicit", b_solver="gmres",
                                      b_max_iter=self.reference_max_iter,
                                      b_tol=self.reference_tol, b_restart=self.reference_restart),
            lam=self.lam, timing_repeats=self.timing_repeats, power_iters=self.power_iters,
            power_tol=self.power_tol, seed=self.seed, device=self.device)

