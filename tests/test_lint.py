"""The workflow's own checks, as `make lint` runs them: snakefmt's format and
`snakemake --lint` (rules with logs, benchmarks, no missing directives)."""
from __future__ import annotations

import subprocess

import pytest


def test_snakefmt_leaves_the_workflow_unchanged(repo_root, venv_bin):
    proc = subprocess.run([str(venv_bin / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.slow
def test_snakemake_lint_finds_nothing(repo_root, venv_bin):
    proc = subprocess.run([str(venv_bin / "snakemake"), "--lint"], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr
