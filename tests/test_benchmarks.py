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
           "--out-csv", str(out / "backward.csv"), "--out-fig", str(out / "fig" / "backward"),
           "--diag-csv", str(out / "diagnostics.csv"), "--ddp-csv", str(out / "ddp.csv")]
    # a hang guard, not a speed target: the quick run takes about 40 s on one core (its GMRES
    # reference at the CIFAR shape runs to the quick run's 100-step cap), more on a loaded one
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
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
    # Every estimator of ours starts from one z*: one forward solve, the same residual.
    ours = [r for r in rows if r["impl"] == "ours"]
    assert len({(r["fwd_nstep"], r["fwd_rel_residual"]) for r in ours}) == 1
    # Only implicit differentiation runs a backward solver.
    for r in ours:
        if r["estimator"] == "implicit":
            assert int(r["bwd_nstep"]) >= 1
        else:
            assert r["bwd_nstep"] == "", r


def test_quick_run_memory_grows_with_k_for_upg_only(quick_run):
    """The one measurement robust enough for a smoke test: tensor bytes are exact."""
    _, rows, _ = quick_run
    mem = {(r["impl"], r["estimator"], r["k"]): float(r["peak_mem_mb"]) for r in rows}
    assert mem[("ours", "upg", "2")] > 1.3 * mem[("ours", "upg", "1")]
    assert mem[("ours", "npg", "2")] < 1.3 * mem[("ours", "npg", "1")]
    assert mem[("ours", "upg", "2")] == pytest.approx(mem[("torchdeq", "upg", "2")], rel=0.1)


def test_quick_run_measures_the_diagnostics_and_the_reference(quick_run):
    out, _, stdout = quick_run
    with open(out / "diagnostics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cost = {r["shape"]: r for r in rows if r["part"] == "cost"}
    assert set(cost) == {"digits", "cifar_shape"}
    for r in cost.values():
        assert int(r["diagnostics"]) >= 1 and int(r["steps"]) > int(r["diagnostics"])
        assert float(r["diagnostics_s"]) > 0 and float(r["step_s"]) > 0
    ref = [r for r in rows if r["part"] == "reference"]
    assert len(ref) == 3 and "GMRES" in ref[-1]["case"]
    assert float(ref[-1]["cos_F_vs_gmres"]) == pytest.approx(1.0, abs=1e-9)  # itself
    assert float(ref[-1]["rel_residual"]) <= 1e-8  # the reference met its tolerance
    for r in ref[:-1]:  # the float32 Broyden solves, against it
        cos, residual = float(r["cos_F_vs_gmres"]), float(r["rel_residual"])
        assert -1 - 1e-9 <= cos <= 1 + 1e-9, r
        assert residual > float(ref[-1]["rel_residual"]), r  # GMRES is the tightest
        if residual < 1e-4:  # a solved system gives the reference's direction
            assert cos > 0.999, r
    assert "wrote" in stdout and "diagnostics.csv" in stdout


def test_quick_run_writes_the_figure_and_a_summary(quick_run):
    out, _, stdout = quick_run
    assert (out / "fig" / "backward.png").stat().st_size > 0
    assert (out / "fig" / "backward.pdf").stat().st_size > 0
    assert "ours/torchdeq" in stdout and "peak memory" in stdout


def test_quick_run_times_a_ddp_step_two_ranks_over_one(quick_run):
    """The DDP step time of the loop's own step, 2 gloo CPU ranks against 1 process."""
    out, rows, stdout = quick_run
    with open(out / "ddp.csv", newline="") as fh:
        ddp = list(csv.DictReader(fh))
    assert len(ddp) == 1 and ddp[0]["config"] == rows[0]["config"] == "tiny"
    one, two = float(ddp[0]["step_1rank_s"]), float(ddp[0]["step_2ranks_s"])
    assert one > 0 and two > 0
    assert float(ddp[0]["ratio_2ranks_over_1"]) == pytest.approx(two / one, rel=1e-4)
    assert ddp[0]["batch_per_rank"] == "4" and "ddp.csv" in stdout


def test_deq_transformer_config_runs_every_case(tmp_path):
    """``--config deq_transformer --quick``: a 62K-parameter model on random ids; every
    case timed and measured, the ratios against implicit + JR written, the summary
    printed. About 10-25 s on 2 cores."""
    out = tmp_path / "deq_transformer.csv"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.backward", "--config",
                           "deq_transformer", "--quick", "--threads", "1", "--out-csv", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"implicit_jr", "implicit", "upg_jr_f14", "upg_jr_f20", "upg_f14", "npg",
                         "implicit_f30"}
    assert int(rows["implicit_f30"]["f_thres"]) == 30 and int(rows["implicit_f30"]["b_thres"]) == 35
    assert float(rows["implicit_f30"]["step_ratio_implicit_f30_over_this"]) == 1.0
    for r in rows.values():
        for col in ("forward_s", "backward_s", "step_s", "peak_mem_mb"):
            assert float(r[col]) > 0, (r["case"], col)
    assert float(rows["implicit_jr"]["step_ratio_implicit_jr_over_this"]) == 1.0
    # the JR penalty keeps its graph for the backward: more tensor memory, never less
    assert float(rows["upg_jr_f14"]["peak_mem_mb"]) > float(rows["upg_f14"]["peak_mem_mb"])
    assert int(rows["upg_jr_f20"]["f_thres"]) == 20 and rows["npg"]["jr_weight"] == "0"  # %.6g
    assert "implicit + JR 2.0 / upg_jr_f14" in proc.stdout and "peak memory JR on / off" in proc.stdout


def test_the_summary_says_which_scale_the_speed_claim_can_read(quick_run):
    """summary.json beside backward.csv tells the report the scale: the quick CPU run is
    not the paper's shape; the paper's shape, budgets and k = 5 on CUDA are, and on the
    CPU, or with other budgets, they are not."""
    import argparse
    import json

    from benchmarks.backward import PAPER_SHAPE, run_summary
    out, rows, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scale"] == "default" and summary["batch"] == 4
    assert summary["machine"]["device"] == "cpu" and summary["git_commit"]
    paper = argparse.Namespace(**PAPER_SHAPE, ks=[1, 5, 10], device="cuda", f_tol=1e-9,
                               b_tol=1e-9, repeats=5, check_every=1, graph=False)
    assert run_summary(paper, rows)["scale"] == "paper"
    assert run_summary(paper, rows)["dataset"] == "cifar10-shape"
    for change in (dict(device="cpu"), dict(b_thres=24), dict(batch=128), dict(ks=[1, 10])):
        assert run_summary(argparse.Namespace(**{**vars(paper), **change}), rows)["scale"] \
            == "default", change
