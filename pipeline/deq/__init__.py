"""The mathematics of implicit layers: solvers, gradient estimators, spectral tools.

Knows nothing of Snakemake, MLflow or files.
"""
from .grad import (ESTIMATORS, PHANTOMS, EstimatorConfig, LayerRecord, attach_estimator,
                   attach_phantom, dense_backward, dense_jacobian, dense_solve, implicit_layer,
                   record_layers, replay_layers, unroll)
from .jacobian import JacobianRegConfig, frobenius_estimate, jacobian_penalty
from .solvers import (LINEAR_SOLVERS, SOLVERS, SolverConfig, SolverStats, get_solver, gmres,
                      register_solver, solve)
from .spectral import (PowerEstimate, jacobian_spectral_radius, power_iteration, power_method,
                       spectral_norm, spectral_normalize, spectral_radius)

__all__ = [
    "ESTIMATORS", "PHANTOMS", "EstimatorConfig", "implicit_layer", "attach_estimator",
    "attach_phantom", "unroll", "dense_backward", "dense_jacobian", "dense_solve",
    "LayerRecord", "record_layers", "replay_layers",
    "SOLVERS", "LINEAR_SOLVERS", "SolverConfig", "SolverStats", "get_solver", "register_solver",
    "solve", "gmres",
    "PowerEstimate", "power_iteration", "power_method", "spectral_radius",
    "jacobian_spectral_radius", "spectral_norm", "spectral_normalize",
    "JacobianRegConfig", "frobenius_estimate", "jacobian_penalty",
]
