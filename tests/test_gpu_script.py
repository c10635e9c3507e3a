"""``benchmarks/gpu.sh --quick``: the GPU check script's CPU rehearsal, end to end.

Every step of the script runs on tiny shapes on the CPU (the CUDA-only parts say "n/a"),
so a GPU session finds a script that works: each step is reported "ok" in the summary,
the resume check is bitwise equal, and the CSVs have the rows the GPU run will fill.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest

pytest.importorskip("torchdeq")

STEPS = ("solve_profile", "train_step", "resume", "backward_large_cifar_fixed",
         "backward_large_cifar_tol", "backward_small_imagenet", "deq_transformer", "synthetic", "cuda_tests")


@pytest.mark.slow
def test_the_gpu_script_rehearses_every_step_on_the_cpu(tmp_path, repo_root, venv_bin):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": str(venv_bin / "python"), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--quick", str(out)], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "CPU rehearsal" in summary and "torch " in summary
    for step in STEPS:
        assert f"- {step}: ok" in summary, summary
    resume = json.loads((out / "resume_check.json").read_text())
    assert resume["losses_equal"] and resume["weights_bitwise_equal"], resume
    with open(out / "solve_profile.csv", newline="") as fh:
        cases = {r["case"] for r in csv.DictReader(fh)}
    assert {"ours, residual read every step", "ours, read once (fixed budget)",
            "ours, read once, F from a CUDA graph", "TorchDEQ broyden",
            "F eager (weight norm each call)", "F eager, weight norm cached"} <= cases
    with open(out / "train_step.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(float(r["step_s"]) > 0 for r in rows)
    with open(out / "backward_large_cifar_fixed" / "backward.csv", newline="") as fh:
        ours = [r for r in csv.DictReader(fh) if r["impl"] == "ours"]
    assert ours and all(r["check_every"] == "0" and r["graph"] == "True" for r in ours)
    # what the report's backward-speed claims read: the rehearsal's tiny shapes are not the
    # paper's, so both say default; the tolerance-stopped run carries its tolerances
    fixed, tol = (json.loads((out / f"backward_large_cifar_{mode}" / "summary.json").read_text())
                  for mode in ("fixed", "tol"))
    assert fixed["scale"] == tol["scale"] == "default"
    assert fixed["f_tol"] < 1e-6 and tol["f_tol"] == tol["b_tol"] == 1e-3
