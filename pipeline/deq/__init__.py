"""The mathematics of implicit layers: solvers, gradient estimators, spectral tools.

Knows nothing of Snakemake, MLflow or files. :mod:`.config` holds the configurations and
the names of the solvers and estimators, without torch: params.yaml is validated with them
in the Snakefile's process, which then never imports torch. Every other name here needs
torch and comes from its module when first asked for (``from pipeline.deq import solve``
imports :mod:`.solvers`).
"""
from importlib import import_module

_MODULE_OF = {name: module for module, names in {
    "config": ("ESTIMATORS", "PHANTOMS", "SOLVER_NAMES", "LINEAR_SOLVERS", "STOP_MODES",
               "SolverConfig", "EstimatorConfig", "JacobianRegConfig"),
    "grad": ("implicit_layer", "attach_estimator", "attach_phantom", "unroll",
             "dense_backward", "dense_jacobian", "dense_solve", "LayerRecord", "record_layers",
             "replay_layers"),
    "solvers": ("SOLVERS", "SolverStats", "get_solver", "solve", "gmres"),
    "spectral": ("PowerEstimate", "power_iteration", "power_method", "spectral_radius",
                 "jacobian_spectral_radius", "spectral_norm", "spectral_normalize"),
    "jacobian": ("frobenius_estimate", "jacobian_penalty"),
}.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # the next lookup finds it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
