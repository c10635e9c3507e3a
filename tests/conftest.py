"""Shared fixtures: where the repository and its virtual environment live."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds params.yaml, Snakefile, pipeline/)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The bin/ folder of the interpreter running the tests (.venv/bin here): python, snakemake."""
    return Path(sys.executable).parent


def snakemake(workdir: Path, venv_bin: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(venv_bin / "snakemake"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)


@pytest.fixture(scope="session")
def workflow(tmp_path_factory, repo_root: Path, venv_bin: Path) -> Path:
    """A copy of the workflow after `snakemake --cores 2 figures --configfile tiny.yaml`
    (tests/configs/tiny.yaml): the end-to-end run the e2e, report and MLflow UI tests
    read. Its Snakemake output is in snakemake.out."""
    work = tmp_path_factory.mktemp("workflow")
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(repo_root / name, work / name)
    for name in ("workflow", "profiles", "envs"):
        shutil.copytree(repo_root / name, work / name)
    shutil.copy(repo_root / "tests" / "configs" / "tiny.yaml", work / "tiny.yaml")
    proc = snakemake(work, venv_bin, "figures", "--configfile", "tiny.yaml")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (work / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return work
