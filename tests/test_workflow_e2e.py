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

from pipeline.tracking import job_runs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DIVERGENT = ("exploding",)  # tiny.yaml's run that must end "failed"

FIGURES = [f"synthetic/synthetic_{name}" for name in (
    "cosine.png", "cosine.pdf", "solver_dynamics.png", "solver_dynamics.pdf", "summary.csv",
    "summary.md")] + [f"ablations/ablations_{name}" for name in (
        "table.csv", "table.md", "training.png", "training.pdf")] + [
    f"graph/graph_{name}" for name in ("table.csv", "table.md", "folds.png", "folds.pdf",
                                       "f1.png", "f1.pdf", "dynamics.png", "dynamics.pdf")] + [
    f"vision/vision_{name}" for name in ("table.csv", "table.md", "training.png",
                                         "training.pdf", "caption.rst", "metrics.json")] + [
    f"lm/lm_{name}" for name in ("table.csv", "table.md", "ppl_time.png", "ppl_time.pdf",
                                 "rho.png", "rho.pdf", "caption.rst", "metrics.json")]


from conftest import snakemake  # noqa: E402  (the `workflow` fixture is in conftest.py)


def planned(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The job counts of a dry run's "Job stats" table."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text.split("Job stats:")[1].split("\n\n")[0]
    rows = re.findall(r"^(\w+)\s+(\d+)$", stats, flags=re.M)
    return {rule: int(n) for rule, n in rows if rule != "total"}


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
    assert "≈1.7× backward speedup (abstract)" in table  # upg_sgd's claim, from reference.yaml
    assert set(params["ablations"]["runs"]) <= set(re.findall(r"^\| (\w+)\s", table, re.M))


def test_one_mlflow_run_per_job_with_curves(workflow):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{workflow}/mlruns/mlflow.db")
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    expected = {"synthetic": len(tiny["synthetic"]["Lh"]),
                "ablations": len({**params["ablations"]["runs"], **tiny["ablations"]["runs"]}),
                "vision": len(params["vision"]["runs"])}  # a torchrun job: rank 0's run alone
    for study, count in expected.items():
        exp = client.get_experiment_by_name(study)
        runs = job_runs(client, exp.experiment_id)
        assert len(runs) == count, study
        ids = {r.info.run_id for r in runs}
        parents = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in ids]
        names = {p.info.run_name: p.info.run_id for p in parents}
        # a default run makes no paper-scale parent; the default parent sums up its children
        assert sorted(names) == [f"{study} (default)"]
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {names[f"{study} (default)"]}
        assert parents[0].info.status == ("FAILED" if study == "ablations" else "FINISHED")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        for run in runs:
            failing = run.info.run_name in DIVERGENT
            assert run.info.status == ("FAILED" if failing else "FINISHED"), run.info.run_name
            assert {"git_commit", "params_hash", "study", "rule", "wildcards", "scale"} <= set(run.data.tags)
            assert {"env.python", "env.torch", "env.gpu", "env.deterministic",
                    "env.lock_sha256", "env.cudnn_allow_tf32", "env.cpu", "env.cpu_capability"} \
                <= set(run.data.tags), run.data.tags
    run = job_runs(client, client.get_experiment_by_name("synthetic").experiment_id)[0]
    assert len(client.get_metric_history(run.info.run_id, "grad/cos_sim/upg_lam0.5")) == \
        len(tiny["synthetic"]["grid"]["k"])
    assert len(client.get_metric_history(run.info.run_id, "grad/cos_sim/broyden")) == \
        tiny["synthetic"]["dynamics"]["max_iter"] + 1


def test_runs_record_their_dataset_and_environment(workflow, repo_root):
    """An ablation run's dataset is an MLflow input (name, digest: the sha256 of the digits
    files it trained on; one input, its context the splits it serves, train+test: MLflow
    keeps one input per (name, digest) and run); the synthetic run's, the digest of its
    generator settings; metrics.json holds the environment with the lock's hash."""
    from mlflow.tracking import MlflowClient

    from pipeline.data import dataset_digest
    from pipeline.environment import lock_sha256
    client = MlflowClient(f"sqlite:///{workflow}/mlruns/mlflow.db")
    metrics = json.loads((workflow / "results/ablations/upg_sgd/metrics.json").read_text())
    run = client.get_run(metrics["mlflow_run_id"])
    inputs = run.inputs.dataset_inputs
    sha = dataset_digest(workflow / "data/digits")
    assert [i.dataset.name for i in inputs] == ["digits"]
    assert inputs[0].dataset.digest == sha[:32]
    tags = {t.key: t.value for t in inputs[0].tags}
    assert tags["mlflow.data.context"] == "train+test" and tags["sha256"] == sha
    env = metrics["environment"]
    assert env["lock_sha256"] == lock_sha256() == run.data.tags["env.lock_sha256"]
    assert env["lock_sha256"] is not None and env["deterministic"] is True
    assert env["gpu"] == "cpu" and env["host_cores"] >= 1 and env["torch_threads"] >= 1
    assert "environment" not in json.dumps(metrics["params_hash"])
    syn = json.loads((workflow / "results/synthetic/Lh=0.9/summary.json").read_text())
    syn_inputs = client.get_run(syn["mlflow_run_id"]).inputs.dataset_inputs
    assert {i.dataset.digest for i in syn_inputs} == {syn["dataset_sha256"][:32]}
    assert syn["environment"]["torch"]


def test_a_divergent_ablation_is_failed_everywhere_and_named_at_the_end(workflow):
    """tiny.yaml's `exploding` run (Adam at lr 1000: a huge loss, never NaN) concludes as a
    result, not a crash: the other jobs and the figures complete, and the user is told."""
    from mlflow.tracking import MlflowClient
    for name in DIVERGENT:
        metrics = json.loads((workflow / f"results/ablations/{name}/metrics.json").read_text())
        assert metrics["status"] == "failed" and "x the early loss" in metrics["reason"]
        run = MlflowClient(f"sqlite:///{workflow}/mlruns/mlflow.db").get_run(
            metrics["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"] == metrics["reason"]
        table = (workflow / "figures/ablations/ablations_table.md").read_text()
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert "FAILED: loss" in row, row
        tail = (workflow / "snakemake.out").read_text().split("Finished job")[-1]
        assert "run(s) FAILED" in tail and f"ablations/{name}: {metrics['reason']}" in tail, tail


def test_graph_study_runs_every_fold_and_seed_in_one_job(workflow):
    """IGNN (appendix §4.3): each job trains its folds / seeds in-process, one MLflow child
    run per unit under the job's parent; the table has both protocols and the references."""
    from mlflow.tracking import MlflowClient
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    client = MlflowClient(f"sqlite:///{workflow}/mlruns/mlflow.db")
    units = {"graph": tiny["graph"]["defaults"]["data"]["folds"],
             "node": tiny["node"]["defaults"]["data"]["seeds"]}
    for study, count in units.items():
        exp = client.get_experiment_by_name(study)
        for name in params[study]["runs"]:
            metrics = json.loads((workflow / f"results/{study}/{name}/metrics.json").read_text())
            assert metrics["status"] == "finished" and len(metrics["units"]) == count, name
            parent = client.get_run(metrics["mlflow_parent_run_id"])
            assert parent.data.tags["role"] == "parent" and parent.info.status == "FINISHED"
            children = client.search_runs(
                [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
            assert sorted(c.info.run_name for c in children) == \
                sorted(f"{name}/{u['unit']}" for u in metrics["units"])
            assert sorted(p.stem for p in (workflow / f"results/{study}/{name}/weights").glob("*.pt")) \
                == sorted(u["unit"] for u in metrics["units"])
            curves = pd.read_csv(workflow / f"results/{study}/{name}/curves.csv")
            for column in ("solver/stop_residual", "time/backward_s", "spectral/rho",
                           "spectral/rho_lambda", "grad/cos_sim_F"):
                assert curves[column].notna().any(), (name, column)
            assert curves["grad/ref_converged"].dropna().eq(1.0).all(), name
    table = (workflow / "figures/graph/graph_table.md").read_text()
    assert "official (paper's)" in table and "| clean" in table
    assert "PROTEINS" in table and "77.7" in table and "97.6" in table  # from reference.yaml
    assert "not available" in table
    assert {"mutag", "chains"} <= set(re.findall(r"^\| (\w+)\s", table, re.M))


def test_vision_study_trains_every_run_one_through_torchrun(workflow):
    """Appendix §4.3 at the default scale: CIFAR-style runs on the digits, ImageNet-style
    runs on the digits ImageFolder tree, one of them on 2 gloo ranks under torchrun; rho and
    rho_lambda after training; a table that names the scale and the dataset."""
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    manifest = json.loads((workflow / "data/digits_imagefolder/manifest.json").read_text())
    assert manifest["n_val"] == 360 and len(manifest["files"]["train"]) == manifest["n_train"]
    for name, run in params["vision"]["runs"].items():
        metrics = json.loads((workflow / f"results/vision/{name}/metrics.json").read_text())
        assert metrics["status"] == "finished", (name, metrics["reason"])
        assert metrics["steps"] == tiny["vision"]["defaults"]["max_steps_per_epoch"]
        assert metrics["world_size"] == run.get("nproc_per_node", 1)
        assert metrics["dataset"] == ("digits_imagefolder" if run.get("task") == "imagefolder"
                                      else "digits")
        assert "top5" in metrics["history"][-1], name
        assert metrics["spectral"]["samples"] == 360 and metrics["spectral"]["rho"] > 0
    log = (workflow / "logs/train_vision/imagenet_small_upg.log").read_text()
    assert "imagefolder task" in log and log.count("vision/imagenet_small_upg: finished") == 1
    table = (workflow / "figures/vision/vision_table.md").read_text()
    assert "Scale: default" in table and "digits_imagefolder" in table
    assert "not comparable (digits at scale default; the paper: cifar10 at scale paper)" in table
    assert set(params["vision"]["runs"]) <= set(re.findall(r"^\| (\w+)\s", table, re.M))
    runtime = pd.read_csv(workflow / "figures/report/runtime.csv")
    vision = runtime[runtime["study"] == "vision"].iloc[0]
    assert vision["jobs"] == len(params["vision"]["runs"]) + 2  # + report, ImageFolder export


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
    assert planned(proc) == {"train_ablation": 1, "report_ablations": 1, "paper_vs_ours": 1,
                             "figures": 1}
    assert "run=no_dropout" in proc.stdout


def test_editing_a_synthetic_key_reruns_the_synthetic_jobs_only(workflow, venv_bin):
    edit = _edit(workflow, "edit_synthetic.yaml", {"synthetic": {"dynamics": {"phantom_lam": 0.7}}})
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--configfile", "tiny.yaml", edit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    assert planned(proc) == {"synthetic_study": len(tiny["synthetic"]["Lh"]),
                             "plot_synthetic": 1, "paper_vs_ours": 1, "figures": 1}


def test_adding_an_Lh_runs_one_new_job(workflow, venv_bin):
    tiny = yaml.safe_load((workflow / "tiny.yaml").read_text())
    edit = _edit(workflow, "edit_lh.yaml", {"synthetic": {"Lh": tiny["synthetic"]["Lh"] + [0.99]}})
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--configfile", "tiny.yaml", edit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned(proc) == {"synthetic_study": 1, "plot_synthetic": 1, "paper_vs_ours": 1,
                             "figures": 1}
    assert "Lh=0.99" in proc.stdout


def test_paper_scale_dry_run_lists_every_ablation(workflow, venv_bin):
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--config", "scale=paper")
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    jobs = planned(proc)
    assert jobs["train_ablation"] == len(params["ablations"]["runs"])
    assert jobs["download_cifar10"] == 1
    assert jobs["synthetic_study"] == len(params["synthetic"]["Lh"])
    # IGNN: COX2 and PROTEINS from the TU archives, PPI from DGL's; one job per dataset x
    # method x protocol (graphs), per dataset x method (PPI, both protocols from one run)
    assert jobs["download_tu"] == 2 and jobs["download_ppi"] == 1
    assert jobs["train_graph"] == 2 * 2 * 2 and jobs["train_node"] == 2
    # DEQ-Transformer: WikiText-103, every run on 4 GPUs; the paper scale's runs (with the
    # official no-JR script's own postln_implicit_official) and the DEQ protocol's baseline
    paper_lm = params["scales"]["paper"]["lm.runs"]
    assert {"postln_implicit", "postln_implicit_official"} <= set(paper_lm)
    assert paper_lm["postln_implicit"]["f_max_iter"] == 30
    assert jobs["download_wikitext103"] == 1 and jobs["train_lm"] == len(paper_lm)
    lm_jobs = re.findall(r"rule train_lm:.*?resources: ([^\n]*)", proc.stdout + proc.stderr,
                         flags=re.S)
    assert len(lm_jobs) == len(paper_lm) and all("gpu=4" in r for r in lm_jobs)
    assert "wildcards: run=postln_implicit\n" in proc.stdout + proc.stderr
    graph = subprocess.run([str(venv_bin / "snakemake"), "-n", "graph", "--config", "scale=paper"],
                           cwd=workflow, capture_output=True, text=True)
    assert graph.returncode == 0, graph.stderr[-3000:]
    assert planned(graph)["train_graph"] == 8 and "PROTEINS.zip" in graph.stdout
    # vision: every paper run, each job asking for its GPUs (4 for CIFAR-10, 8 or 4 for
    # ImageNet, as the official scripts), ImageNet through its manifest only
    paper = yaml.safe_load((workflow / "params.yaml").read_text())["scales"]["paper"]["vision.runs"]
    assert jobs["train_vision"] == len(paper) and jobs["validate_imagenet"] == 1
    vision = subprocess.run([str(venv_bin / "snakemake"), "-n", "vision", "--config",
                             "scale=paper"], cwd=workflow, capture_output=True, text=True)
    assert vision.returncode == 0, vision.stderr[-3000:]
    assert planned(vision)["train_vision"] == len(paper)
    for name, run in paper.items():
        block = vision.stdout.split(f"wildcards: run={name}\n")[1].split("\n\n")[0]
        assert f"gpu={run['nproc_per_node']}" in block, (name, block)
        assert f"torchrun --standalone --nproc_per_node={run['nproc_per_node']}" in block, block


def test_lm_study_records_every_run_and_a_row_per_claim(workflow):
    """Each DEQ-Transformer run ends finished (with a test perplexity) or failed (with its
    reason); the table names every run and gives each claim a status."""
    params = yaml.safe_load((workflow / "params.yaml").read_text())
    for name in params["lm"]["runs"]:
        metrics = json.loads((workflow / f"results/lm/{name}/metrics.json").read_text())
        assert metrics["task"] == "lm" and metrics["steps"] >= 1, name
        if metrics["status"] == "failed":
            assert metrics["reason"], name
        else:
            assert metrics["status"] == "finished" and metrics["test_ppl"] > 1, name
        curves = pd.read_csv(workflow / f"results/lm/{name}/curves.csv")
        assert {"train/ppl", "train/jr_weight", "time/tokens_per_s"} <= set(curves.columns)
    table = (workflow / "figures/lm/lm_table.md").read_text()
    assert set(params["lm"]["runs"]) <= set(re.findall(r"^\| (\w+)\s", table, re.M))
    summary = json.loads((workflow / "figures/lm/lm_metrics.json").read_text())
    assert len(summary["claims"]) == 8
    assert set(summary["claims"].values()) <= {"reproduced", "not reproduced at this scale"}
