"""The run's ``deterministic`` switch, and the numerics settings every run records.

On (the default scale's choice): ``torch.use_deterministic_algorithms(True,
warn_only=True)``, cuDNN's autotuner off, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS
needs it for deterministic matrix products; it is read when CUDA starts, so the train job
sets it before anything touches the GPU). A killed run then resumes bitwise equal to an
uninterrupted one, on the CPU and on CUDA. Off: PyTorch's defaults, faster on a GPU (on an
H200, 2026-12-04, MDEQ large at batch 128: +17% step time for implicit differentiation
and +49% for UPG A_{5,0.5} with it on), and a resume equal only to float tolerance.

Either way the run records (:func:`pipeline.environment.numerics`) the switch and the TF32
settings: cuDNN's
TF32 for convolutions is on by PyTorch's default, an error near 1e-3, the size of a
typical forward tolerance.
"""
from __future__ import annotations

import os

import torch

from pipeline.environment import numerics

CUBLAS_WORKSPACE = ":4096:8"


def configure(deterministic: bool) -> dict:
    """Apply the switch (see the module docstring); return the numerics settings."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return numerics()
