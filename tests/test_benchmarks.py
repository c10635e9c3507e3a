"""Smoke test of the backward-pass benchmark: ``python -m benchmarks.backward --quick``.

Runs the real command line in a subprocess (batch 4, 8x8 images, 3 solver steps,
k in {1, 2}, one repeat) into a temporary directory, then checks the CSV's shape
and the figure files. It checks that the benchmark runs, not what it measures:
timings on a shared CI machine mean nothing. About 10-20 s on 2 cores.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdeq")

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_COLUMNS = {
    "estimator", "k", "lam", "impl", "model", "batch", "forward_s", "est_forward_s",
    "backward_s", "grad_s", "step_s", "peak_mem_mb", "solve_mem_mb", "b_thres",
    "grad_speedup_vs_implicit", "grad_ratio_ours_over_torchdeq", "cpu", "cores", "torch",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.backward", "--quick", "--silent",
           "--out-csv", str(out / "backward.csv"), "--out-fig", str(out / "fig" / "backward")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "backward.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return out, rows, proc.stdout


def test_quick_run_writes_a_tidy_csv(quick_run):
    _, rows, _ = quick_run
    assert rows
    assert EXPECTED_COLUMNS <= set(rows[0])
    cases = {(r["impl"], r["estimator"], r["k"]) for r in rows}
    assert {("ours", "implicit", ""), ("ours", "jfb", "1"), ("ours", "upg", "1"),
            ("ours", "upg", "2"), ("ours", "npg", "1"), ("ours", "npg", "2"),
            ("torchdeq", "implicit", ""), ("torchdeq", "upg", "2")} <= cases
    for r in rows:
        assert r["batch"] == "4"
        for col in ("forward_s", "backward_s", "grad_s", "step_s", "peak_mem_mb"):
            assert float(r[col]) > 0, (r["impl"], r["estimator"], col)
        assert float(r["grad_s"]) == pytest.approx(
            float(r["est_forward_s"]) + float(r["backward_s"]), rel=0.5)


def test_quick_run_memory_grows_with_k_for_upg_only(quick_run):
    """The one measurement robust enough for a smoke test: tensor bytes are exact."""
    _, rows, _ = quick_run
    mem = {(r["impl"], r["estimator"], r["k"]): float(r["peak_mem_mb"]) for r in rows}
    assert mem[("ours", "upg", "2")] > 1.3 * mem[("ours", "upg", "1")]
    assert mem[("ours", "npg", "2")] < 1.3 * mem[("ours", "npg", "1")]
    assert mem[("ours", "upg", "2")] == pytest.approx(mem[("torchdeq", "upg", "2")], rel=0.1)


def test_quick_run_writes_the_figure_and_a_summary(quick_run):
    out, _, stdout = quick_run
    assert (out / "fig" / "backward.png").stat().st_size > 0
    assert (out / "fig" / "backward.pdf").stat().st_size > 0
    assert "ours/torchdeq" in stdout and "peak memory" in stdout
