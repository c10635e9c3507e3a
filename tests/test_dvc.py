"""DVC round trip in a throw-away git repository built from this one's dvc.yaml, .dvc/config
and data rules: `dvc repro` runs the Snakemake target, `dvc status` is clean, and
`dvc push`, deleting data/ and the cache, then `dvc pull` restores the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STAGE = "data@digits"
COPIED = ["dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "params.yaml",
          "workflow/rules/common.smk", "workflow/rules/data.smk", "envs/pipeline.yaml"]


def _env() -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # The stage's command is `snakemake ...`: it must find this environment's Snakemake.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, repo_root) -> Path:
    """A git repository with this project's DVC setup and data rules (and nothing else)."""
    root = tmp_path / "project"
    for rel in COPIED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo_root / rel, root / rel)
    shutil.copytree(repo_root / "pipeline", root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "Snakefile").write_text('configfile: "params.yaml"\n'
                                    'include: "workflow/rules/common.smk"\n'
                                    'include: "workflow/rules/data.smk"\n')
    _run(root, "git", "init", "-q")
    return root


def test_repro_push_delete_pull_restores_the_same_bytes(project):
    # The default remote is a directory inside the repository (git-ignored): no network.
    config = (project / ".dvc" / "config").read_text()
    assert "remote = local" in config and "url = ../.dvc-storage" in config
    assert "analytics = false" in config

    dvc(project, "repro", STAGE)  # runs `snakemake --cores all export_digits`
    data = project / "data" / "digits"
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    # Bytecode written by later imports must not count as a code change (.dvcignore).
    (project / "pipeline" / "data" / "__pycache__").mkdir(exist_ok=True)
    (project / "pipeline" / "data" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert json.loads(dvc(project, "status", "--json", STAGE)) == {}
    lock = (project / "dvc.lock").read_text()
    assert "data/digits" in lock and "data.digits" in lock  # outs and params recorded

    before = _hashes(data)
    dvc(project, "push", STAGE)
    assert (project / ".dvc-storage" / "files" / "md5").is_dir()
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    dvc(project, "pull", STAGE)
    assert _hashes(data) == before
    assert json.loads(dvc(project, "status", "--json", STAGE)) == {}
    # Nothing changed, so a second repro hands nothing to Snakemake.
    assert "didn't change, skipping" in dvc(project, "repro", STAGE)


def _max_lr(root: Path) -> float:
    import csv
    with open(root / "results/ablations/sgd/curves.csv") as f:
        return max(float(r["train/lr"]) for r in csv.DictReader(f))


def _ablation_metrics(root: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "results/ablations").glob("*/metrics.json")}


@pytest.mark.slow
@pytest.mark.e2e
def test_exp_run_set_param_reruns_only_that_ablation(workflow, repo_root, tmp_path):
    """`dvc exp run -S ablations.runs.sgd.lr=0.05` on the tiny run's results: Snakemake reruns
    the sgd ablation alone (and the tables that read it), and `dvc exp show` lists its
    accuracy beside the baseline's."""
    import yaml

    from pipeline.config import deep_merge
    root = tmp_path / "exp"
    shutil.copytree(workflow, root, symlinks=True,
                    ignore=shutil.ignore_patterns("locks", ".git", ".dvc", "tiny.yaml"))
    params = deep_merge(yaml.safe_load((workflow / "params.yaml").read_text()),
                        yaml.safe_load((workflow / "tiny.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # tiny = params.yaml
    for rel in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(repo_root / rel, root / rel)
    shutil.copytree(repo_root / "pipeline", root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    shutil.copy(repo_root / ".dvc/config", root / ".dvc/config")
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny")

    before = _ablation_metrics(root)
    dvc(root, "repro")  # the baseline: Snakemake finds everything up to date
    assert _ablation_metrics(root) == before
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    baseline = json.loads((root / "figures/ablations/ablations_metrics.json").read_text())
    lr_before = _max_lr(root)

    dvc(root, "exp", "run", "-S", "ablations.runs.sgd.lr=0.05")
    after = _ablation_metrics(root)
    assert {name for name in before if after[name] != before[name]} == {"sgd"}
    sgd = json.loads((root / "results/ablations/sgd/metrics.json").read_text())
    # the same cosine schedule from 0.05 instead of 0.1 (its eta_min 1e-6 shifts the ratio by 1e-5)
    assert _max_lr(root) == pytest.approx(lr_before * 0.05 / 0.1, rel=1e-4)

    shown = json.loads(dvc(root, "exp", "show", "--json"))
    rows = {}
    for commit in shown:
        for rev in [commit, *[e for exp in commit.get("experiments") or [] for e in exp["revs"]]]:
            data = rev.get("data") or {}
            metrics = data.get("metrics", {}).get("figures/ablations/ablations_metrics.json", {})
            lr = data.get("params", {}).get("params.yaml", {}).get("data", {})
            if metrics.get("data"):
                rows[rev["rev"]] = (lr.get("ablations", {}).get("runs", {}).get("sgd", {}).get("lr"),
                                    metrics["data"]["sgd"]["best"])
    assert (0.1, baseline["sgd"]["best"]) in rows.values(), rows
    assert (0.05, sgd["best"]) in rows.values(), rows
