"""Smoke test of the synthetic benchmark: ``python -m benchmarks.synthetic --quick``.

Runs the real command line (2 pairs of 4 x 16, k in {1, 2}, lambda in {0.5, 1}, one
repeat) into a temporary folder and checks the CSV's shape, the FLOP count and the
figure: that the benchmark runs, not what it measures (timings on a shared machine mean
nothing). A few seconds.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.synthetic import grid_flops
from pipeline.experiments.synthetic import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_synthetic")
    cmd = [sys.executable, "-m", "benchmarks.synthetic", "--quick", "--silent", "--threads", "1",
           "--out-csv", str(out / "synthetic.csv"), "--out-fig", str(out / "fig" / "synthetic")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "synthetic.csv", newline="") as fh:
        return out, list(csv.DictReader(fh)), proc.stdout


def test_quick_run_writes_every_case(quick_run):
    _, rows, stdout = quick_run
    cases = {(r["case"], r["layout"]): r for r in rows}
    assert set(cases) == {(c, lay) for c in ("grid", "chunk", "matmul")
                          for lay in ("batched", "unbatched")}
    for case in ("grid", "chunk"):
        for layout in ("batched", "unbatched"):
            r = cases[(case, layout)]
            assert float(r["seconds"]) > 0 and float(r["seconds_per_pair"]) > 0
            assert float(r["batched_over_unbatched"]) > 0
    # the batched layout's matrix products have lambda times the rows
    assert int(cases[("matmul", "batched")]["matmul_rows"]) == 2 * 4 * 2
    assert int(cases[("matmul", "unbatched")]["matmul_rows"]) == 2 * 4
    g = cases[("grid", "batched")]
    assert float(g["ratio_to_matmul"]) == pytest.approx(
        float(g["gflops"]) / float(g["matmul_gflops"]), rel=1e-4)
    assert "batched / unbatched" in stdout and "GFLOP/s" in stdout


def test_quick_run_writes_the_figure(quick_run):
    out, _, _ = quick_run
    assert (out / "fig" / "synthetic.png").stat().st_size > 0
    assert (out / "fig" / "synthetic.pdf").stat().st_size > 0


def test_grid_flops_count_the_matrix_products():
    """UPG A_k: k F's and k VJPs (4 k R D^2); NPG A_k: one F, k - 1 hook VJPs and one to u."""
    cfg = SyntheticConfig(Lh=0.9, rows=2, dim=3, ks=(1, 2), lams=(0.5,))
    R, D2 = 2 * 5 * 1, 9  # rows x pairs x lambda, D^2
    upg = (4 * 1 + 4 * 2) * R * D2
    npg = (2 * 2 + 2 * 3) * R * D2
    assert grid_flops(cfg, pairs=5) == upg + npg
