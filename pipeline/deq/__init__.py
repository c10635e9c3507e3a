"""The mathematics of implicit layers: solvers, gradient estimators, spectral tools.

Knows nothing of Snakemake, MLflow or files.
"""
from .grad import (ESTIMATORS, EstimatorConfig, attach_estimator, dense_backward, implicit_layer,
                   unroll)
from .solvers import SOLVERS, SolverConfig, SolverStats, get_solver, register_solver, solve
from .spectral import (jacobian_spectral_radius, power_method, spectral_norm,
                       spectral_normalize)

__all__ = [
    "ESTIMATORS", "EstimatorConfig", "implicit_layer", "attach_estimator", "unroll", "dense_backward",
    "SOLVERS", "SolverConfig", "SolverStats", "get_solver", "register_solver", "solve",
    "power_method", "jacobian_spectral_radius", "spectral_norm", "spectral_normalize",
]
