"""envs/pipeline.yaml (conda, for --sdm conda) and pyproject.toml list the same dependencies."""
from __future__ import annotations

import tomllib
from pathlib import Path

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


def test_env_installs_the_package_from_the_workdir_wherever_the_file_is_copied(
        repo_root, tmp_path):
    """Snakemake copies envs/pipeline.yaml to .snakemake/conda/<hash>.yaml and has conda
    read the copy, so a path in it resolves from there; the package is installed by the
    post-deploy script instead, which Snakemake runs from the workflow directory. Here:
    the copy holds no path, and the script, run as Snakemake runs it (from the workdir,
    with the env's pip on PATH; a stand-in pip records its arguments), installs the
    repository root."""
    import shutil
    import subprocess
    copied = tmp_path / "work" / ".snakemake" / "conda" / "0123abcd.yaml"
    copied.parent.mkdir(parents=True)
    shutil.copy(repo_root / "envs" / "pipeline.yaml", copied)
    pips = [d["pip"] for d in yaml.safe_load(copied.read_text())["dependencies"]
            if isinstance(d, dict) and "pip" in d][0]
    assert not [d for d in pips if str(d).startswith("-e") or "/" in str(d)], pips
    script = copied.with_suffix(".post-deploy.sh")
    shutil.copy(repo_root / "envs" / "pipeline.post-deploy.sh", script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text('#!/bin/sh\necho "$@" > "$PIP_ARGS"\n')
    (bin_dir / "pip").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PIP_ARGS": str(tmp_path / "args")}
    subprocess.run(["bash", str(script)], cwd=repo_root, env=env, check=True)
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["install", "--no-deps", "-e"]
    assert Path(args[3]) == repo_root and (Path(args[3]) / "pyproject.toml").is_file()
    # from anywhere else it refuses, rather than installing the wrong folder
    assert subprocess.run(["bash", str(script)], cwd=tmp_path, env=env).returncode == 1


def test_conda_python_satisfies_requires_python(repo_root):
    pins = [d for d in _conda_env(repo_root)["dependencies"]
            if isinstance(d, str) and d.split("=")[0].strip() == "python"]
    assert len(pins) == 1, "envs/pipeline.yaml should pin python"
    version = pins[0].split("=", 1)[1].lstrip("=")
    requires = SpecifierSet(_project(repo_root)["requires-python"])
    assert f"{version}.0" in requires or version in requires, (pins[0], str(requires))
