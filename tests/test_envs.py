"""envs/pipeline.yaml (conda, for --sdm conda) and pyproject.toml list the same dependencies."""
from __future__ import annotations

import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet


def _conda_env(repo_root) -> dict:
    return yaml.safe_load((repo_root / "envs" / "pipeline.yaml").read_text())


def _pip_deps(env: dict) -> list[str]:
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "exactly one pip: section expected"
    # "-e ../" installs the package itself (its dependencies are the ones compared here)
    return [str(d).strip() for d in pips[0] if not str(d).strip().startswith("-e ")]


def _project(repo_root) -> dict:
    return tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]


def test_pip_dependencies_match_pyproject(repo_root):
    env_deps = _pip_deps(_conda_env(repo_root))
    project_deps = [d.strip() for d in _project(repo_root)["dependencies"]]
    assert len(env_deps) == len(set(env_deps)), "duplicate entries in envs/pipeline.yaml"
    assert len(project_deps) == len(set(project_deps)), "duplicate entries in pyproject.toml"
    only_env = sorted(set(env_deps) - set(project_deps))
    only_project = sorted(set(project_deps) - set(env_deps))
    assert not only_env and not only_project, (
        f"only in envs/pipeline.yaml: {only_env}; only in pyproject.toml: {only_project}")
    # and as parsed requirements (names normalised, specifiers compared as sets)
    norm = lambda deps: {(Requirement(d).name.lower(), Requirement(d).specifier) for d in deps}
    assert norm(env_deps) == norm(project_deps)


def test_env_installs_the_package_itself(repo_root):
    pips = [d["pip"] for d in _conda_env(repo_root)["dependencies"]
            if isinstance(d, dict) and "pip" in d][0]
    assert "-e ../" in [str(d).strip() for d in pips], \
        "envs/pipeline.yaml should install the package (-e ../, relative to envs/)"


def test_conda_python_satisfies_requires_python(repo_root):
    pins = [d for d in _conda_env(repo_root)["dependencies"]
            if isinstance(d, str) and d.split("=")[0].strip() == "python"]
    assert len(pins) == 1, "envs/pipeline.yaml should pin python"
    version = pins[0].split("=", 1)[1].lstrip("=")
    requires = SpecifierSet(_project(repo_root)["requires-python"])
    assert f"{version}.0" in requires or version in requires, (pins[0], str(requires))
