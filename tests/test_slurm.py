"""The paper-scale DAG submitted through the real SLURM executor plugin, to stand-in SLURM
commands (tests/fake_slurm.py): each job's sbatch line asks for the GPUs, CPUs, memory and
run time that params.yaml gives it at that scale (`cluster:` and the run's device)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

import fake_slurm
from pipeline.config import load, study_run

pytest.importorskip("snakemake_executor_plugin_slurm",
                    reason='needs the SLURM executor plugin: pip install -e ".[slurm]"')

# rule -> the study whose cluster: entry and runs give its resources
STUDY_RULES = {"synthetic_study": "synthetic", "train_ablation": "ablations",
               "train_graph": "graph", "train_node": "node", "train_vision": "vision",
               "train_lm": "lm"}
PAPER_DATA = {"cifar10": ("train.npz", "test.npz", "meta.json"),
              "wikitext103": ("train.npz", "valid.npz", "test.npz", "vocab.txt", "meta.json"),
              "imagenet": ("manifest.json",),  # validate_imagenet reads a real ImageFolder tree
              **{name: ("graphs.npz", "meta.json") for name in ("cox2", "proteins", "ppi")}}


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _expected(params: dict, rule: str, wildcard: str) -> dict:
    """What params.yaml asks for one job: gpus, cpus (per GPU, or per task), mem, minutes."""
    study = STUDY_RULES[rule]
    cluster = params["cluster"][study]
    run = params["synthetic"] if study == "synthetic" else study_run(params, study, wildcard)
    gpus = run.get("nproc_per_node", 1) if run["device"].startswith("cuda") else 0
    return {"gpus": str(gpus) if gpus else None,
            "cpus_per_gpu": str(cluster["cpus_per_gpu"]) if gpus else None,
            "cpus_per_task": None if gpus else "1",
            "mem": str(cluster["mem_mb"]), "time": str(cluster["runtime_min"])}


@pytest.mark.slow
def test_paper_dag_through_the_slurm_plugin(tmp_path, repo_root, venv_bin):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(repo_root / name, work / name)
    for name in ("workflow", "profiles", "envs"):
        shutil.copytree(repo_root / name, work / name)
    for dataset, files in PAPER_DATA.items():  # pre-seeded: download rules need the network
        (work / "data" / dataset).mkdir(parents=True)
        for f in files:
            (work / "data" / dataset / f).touch()
    snakemake = [str(venv_bin / "snakemake"), "figures", "--omit-from", "paper_vs_ours"]
    dry = subprocess.run([*snakemake, "-n", "--config", "scale=paper"], cwd=work,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = fake_slurm.dry_run_jobs(dry.stdout + dry.stderr)
    fake_slurm.install(tmp_path / "bin", tmp_path / "slurm", jobs)

    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([*snakemake, "--profile", "profiles/slurm", "--workflow-profile", "none",
                           "--slurm-init-seconds-before-status-checks", "1",
                           "--config", "scale=paper"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    submitted = {_flag(a, "--comment"): a for a in fake_slurm.calls(tmp_path / "slurm", "sbatch")}
    local = set(re.findall(r"^localrule (\w+):", out, re.M))  # run on the submitting host
    assert "init_tracking" in local
    remote = {c for c in jobs if c.split("_wildcards_")[0].removeprefix("rule_") not in local}
    assert set(submitted) == remote  # every cluster job once, no local rule
    params = load(str(work / "params.yaml"), "paper")
    checked = 0
    for comment, argv in submitted.items():
        rule, _, wildcard = comment.removeprefix("rule_").partition("_wildcards_")
        line = " ".join(argv)
        assert "--gres" not in line and "slurm_extra" not in line, line
        got = {"gpus": _flag(argv, "--gpus"), "cpus_per_gpu": _flag(argv, "--cpus-per-gpu"),
               "cpus_per_task": _flag(argv, "--cpus-per-task"), "mem": _flag(argv, "--mem"),
               "time": _flag(argv, "-t")}
        if rule in STUDY_RULES:
            assert got == _expected(params, rule, wildcard), (comment, line)
            checked += 1
        else:  # figures: the profile's default-resources, on the CPU
            assert got == {"gpus": None, "cpus_per_gpu": None, "cpus_per_task": "1",
                           "mem": "8000", "time": "60"}, (comment, line)
    assert checked == len(params["synthetic"]["Lh"]) + sum(
        len(params[s]["runs"]) for s in ("ablations", "graph", "node", "vision", "lm"))
    assert "--gpus=1" in " ".join(submitted["rule_train_ablation_wildcards_mdeq"])
    assert {_flag(a, "--gpus") for c, a in submitted.items() if "train_vision" in c} == {"4", "8"}
    status = fake_slurm.calls(tmp_path / "slurm", "sacct") + fake_slurm.calls(tmp_path / "slurm", "squeue")
    assert any("--name" in a for a in status), "the plugin polled the jobs' status"
