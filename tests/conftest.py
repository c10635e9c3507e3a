"""Shared fixtures: where the repository and its virtual environment live."""
from __future__ import annotations

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
