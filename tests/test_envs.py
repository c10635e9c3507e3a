"""The environment a run is made in: requirements.lock (every pin, with hashes) covers
pyproject.toml's ranges, and envs/pipeline.yaml (conda, for --sdm conda) carries its pins."""
from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
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


def _lock(repo_root) -> dict[str, str]:
    """{normalised name: version} of every pin in requirements.lock."""
    import sys
    sys.path.insert(0, str(repo_root / "envs"))
    from from_lock import lock_pins
    pins = [Requirement(p) for p in lock_pins(repo_root / "requirements.lock")]
    return {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in pins}


def unpinned(requirements: list[str], lock: dict[str, str]) -> list[str]:
    """The requirements that no pin of the lock satisfies (missing, or outside the range)."""
    out = []
    for text in requirements:
        req = Requirement(text)
        version = lock.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            out.append(f"{text} (lock: {version or 'missing'})")
    return out


def _requirements(project: dict) -> list[str]:
    return [*project["dependencies"],
            *(r for extra in project["optional-dependencies"].values() for r in extra)]


def test_every_requirement_of_pyproject_has_a_pin_in_the_lock(repo_root):
    """make install installs the lock; a dependency added to pyproject.toml alone (or a
    range the lock's pin leaves) fails here: refresh the lock (Makefile: make lock)."""
    lock = _lock(repo_root)
    assert len(lock) > 200 and "torch" in lock and "mlflow" in lock
    assert unpinned(_requirements(_project(repo_root)), lock) == []
    # and the check sees an addition made to pyproject.toml alone
    project = _project(repo_root)
    project["dependencies"] = [*project["dependencies"], "tomato-sauce>=1"]
    assert unpinned(_requirements(project), lock) == ["tomato-sauce>=1 (lock: missing)"]
    project["dependencies"][-1] = "torch>=9"
    assert unpinned(_requirements(project), lock) == [f"torch>=9 (lock: {lock['torch']})"]


def test_every_pin_of_the_lock_has_a_hash(repo_root):
    text = (repo_root / "requirements.lock").read_text()
    blocks = [b for b in text.split("\n") if "==" in b and not b.startswith("#")]
    assert blocks
    for line in blocks:
        following = text[text.index(line) + len(line):].split("\n", 2)[1]
        assert "--hash=sha256:" in following, line


def test_the_conda_environment_carries_the_lock_pins(repo_root):
    """envs/pipeline.yaml's pip section is the lock's pins (envs/from_lock.py writes it)."""
    import sys
    sys.path.insert(0, str(repo_root / "envs"))
    from from_lock import lock_pins
    assert _pip_deps(_conda_env(repo_root)) == lock_pins(repo_root / "requirements.lock")


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
