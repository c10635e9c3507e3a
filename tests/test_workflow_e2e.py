"""The whole Snakemake DAG, end to end, on a tiny configuration (tests/configs/tiny.yaml).

Runs in a copy of the workflow in a temporary folder: data export, MLflow setup, the
synthetic study, every ablation, and every figure; then checks what a user relies on:
a second run does nothing, and editing one entry plans only what depends on it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIGURES = [f"synthetic/synthetic_{name}" for name in (
    "cosine.png", "cosine.pdf", "solver_dynamics.png", "solver_dynamics.pdf", "summary.csv",
    "summary.md")] + [f"ablations/ablations_{name}" for name in (
        "table.csv", "table.md", "training.png", "training.pdf")]


def snakemake(workdir: Path, venv_bin: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(venv_bin / "snakemake"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)


def planned(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The job counts of a dry run's "Job stats" table."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text.split("Job stats:")[1].split("\n\n")[0]
    rows = re.findall(r"^(\w+)\s+(\d+)$", stats, flags=re.M)
    return {rule: int(n) for rule, n in rows if rule != "total"}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, repo_root: Path, venv_bin: Path):
    work = tmp_path_factory.mktemp("workflow")
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(repo_root / name, work / name)
    for name in ("workflow", "profiles", "envs"):
        shutil.copytree(repo_root / name, work / name)
    shutil.copy(repo_root / "tests" / "configs" / "tiny.yaml", work / "tiny.yaml")
    proc = snakemake(work, venv_bin, "figures", "--configfile", "tiny.yaml")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return work


def test_every_figure_and_result_is_built(workflow):
    for name in FIGURES:
        assert (workflow / "figures" / name).stat().st_size > 0, name
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    for Lh in tiny["synthetic"]["Lh"]:
        summary = json.loads((workflow / f"results/synthetic/Lh={Lh:g}/summary.json").read_text())
        assert summary["Lh"] == Lh and summary["scale"] == "default"
    assert not (workflow / "checkpoints" / "synthetic").exists(), "concluded jobs keep no chunks"
    converged = 0
    for name in params["ablations"]["runs"]:
        metrics = json.loads((workflow / f"results/ablations/{name}/metrics.json").read_text())
        assert metrics["status"] == "finished", metrics["reason"]
        assert metrics["epochs_completed"] == tiny["ablations"]["defaults"]["epochs"]
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", metrics["git_commit"])
        curves = pd.read_csv(workflow / f"results/ablations/{name}/curves.csv")
        if metrics["diagnostics"]["count"]:
            for column in ("grad/ref_rel_residual", "grad/cos_sim_F", "grad/cos_sim_injection",
                           "grad/cos_sim_head", "time/grad_s", "time/grad_implicit_s"):
                assert curves[column].notna().any(), (name, column)
            converged += int(curves["grad/ref_converged"].sum())
    assert converged, "no diagnostics point with a converged reference"
    table = (workflow / "figures/ablations/ablations_table.md").read_text()
    assert "scale: default" in table and "dataset: digits" in table
    assert "cos_F" in table and "ref_residual" in table
    assert set(params["ablations"]["runs"]) <= set(re.findall(r"^\| (\w+)\s", table, re.M))


def test_one_mlflow_run_per_job_with_curves(workflow):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{workflow}/mlruns/mlflow.db")
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    expected = {"synthetic": len(tiny["synthetic"]["Lh"]),
                "ablations": len(params["ablations"]["runs"])}
    for study, count in expected.items():
        exp = client.get_experiment_by_name(study)
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == count, study
        for run in runs:
            assert run.info.status == "FINISHED"
            assert {"git_commit", "params_hash", "study", "rule", "wildcards", "scale"} <= set(run.data.tags)
    run = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])[0]
    assert len(client.get_metric_history(run.info.run_id, "grad/cos_sim/upg_lam0.5")) == \
        len(tiny["synthetic"]["grid"]["k"])
    assert len(client.get_metric_history(run.info.run_id, "grad/cos_sim/broyden")) == \
        tiny["synthetic"]["dynamics"]["max_iter"] + 1


def test_second_run_does_nothing(workflow, venv_bin):
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--configfile", "tiny.yaml")
    assert proc.returncode == 0
    assert planned(proc) == {}, proc.stdout[-3000:]


def _edit(workflow: Path, name: str, overrides: dict) -> str:
    (workflow / name).write_text(yaml.safe_dump(overrides))
    return name


def test_editing_one_ablation_reruns_only_it(workflow, venv_bin):
    edit = _edit(workflow, "edit_ablation.yaml",
                 {"ablations": {"runs": {"no_dropout": {"model": {"dropout": 0.1}}}}})
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--configfile", "tiny.yaml", edit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned(proc) == {"train_ablation": 1, "report_ablations": 1, "figures": 1}
    assert "run=no_dropout" in proc.stdout


def test_editing_a_synthetic_key_reruns_the_synthetic_jobs_only(workflow, venv_bin):
    edit = _edit(workflow, "edit_synthetic.yaml", {"synthetic": {"dynamics": {"phantom_lam": 0.7}}})
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--configfile", "tiny.yaml", edit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    assert planned(proc) == {"synthetic_study": len(tiny["synthetic"]["Lh"]),
                             "plot_synthetic": 1, "figures": 1}


def test_adding_an_Lh_runs_one_new_job(workflow, venv_bin):
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    edit = _edit(workflow, "edit_lh.yaml", {"synthetic": {"Lh": tiny["synthetic"]["Lh"] + [0.99]}})
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--configfile", "tiny.yaml", edit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned(proc) == {"synthetic_study": 1, "plot_synthetic": 1, "figures": 1}
    assert "Lh=0.99" in proc.stdout


def test_paper_scale_dry_run_lists_every_ablation(workflow, venv_bin):
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--config", "scale=paper")
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    jobs = planned(proc)
    assert jobs["train_ablation"] == len(params["ablations"]["runs"])
    assert jobs["download_cifar10"] == 1
    assert jobs["synthetic_study"] == len(params["synthetic"]["Lh"])
