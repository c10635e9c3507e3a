"""What a run ran on, for its record: the software, the machine and the numerics settings.

Every training and synthetic run writes :func:`record` into ``metrics.json`` /
``summary.json`` (``environment``) and into its MLflow tags (``env.<key>``). None of it
enters the params hash or the resume keys: the same settings on another machine are the
same run, and this says where each piece of it ran.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

# the lock file of the checkout the package runs from (make install installs from it)
LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def numerics() -> dict:
    """The numerics settings in force: deterministic algorithms, cuDNN's autotuner and TF32,
    the matmul TF32 and precision, and CUBLAS_WORKSPACE_CONFIG (None where unset)."""
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere). With
    :func:`torch.backends.cpu.get_cpu_capability` it says which kernels a CPU run used:
    the same settings give different float32 rounding on another CPU."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu() -> dict:
    """The CPU and the kernels torch picked for it (AVX2, AVX512, ...): what decides a CPU
    run's float32 rounding, beside the settings."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def lock_sha256(path: Path = LOCK) -> str | None:
    """sha256 of the lock file the environment was installed from; None without one."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def record(device: str = "cpu") -> dict:
    """Python, torch and its CUDA, the GPU (or "cpu"), the CPU and the kernels torch picked
    for it (AVX2, AVX512, ...), the host's cores and torch threads, :func:`numerics`, and the
    lock file's hash."""
    gpu = (torch.cuda.get_device_name(torch.device(device))
           if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "gpu": gpu, **cpu(), "host_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), **numerics(),
            "lock_sha256": lock_sha256()}


def tags(env: dict) -> dict[str, str]:
    """The record as MLflow tags, ``env.<key>``."""
    return {f"env.{k}": str(v) for k, v in env.items()}
