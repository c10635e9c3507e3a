"""params.yaml validation (pipeline/config.py) and its wiring into the CLI and the Snakefile.

Every bad-value test starts from the real params.yaml, changes one key, and checks
that the ParamsError names that key, so the tests keep working as sections are added.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, deep_merge, load, resolve, study_run, validate
from pipeline.config import main as config_main
from pipeline.deq import LINEAR_SOLVERS, SOLVERS


@pytest.fixture(scope="module")
def raw(repo_root) -> dict:
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def _get(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def _rejects(params: dict, *fragments: str, scale: str | None = None) -> str:
    """resolve() must raise ParamsError whose message contains every fragment."""
    with pytest.raises(ParamsError) as info:
        resolve(params, scale)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message:\n{message}"
    return message


# --- the real file ---------------------------------------------------------------------------

def test_real_params_valid_at_default_scale(repo_root, raw):
    params = load(repo_root / "params.yaml", "default")
    assert params["scale"] == "default"
    expected = copy.deepcopy(raw)
    expected["scale"] = "default"
    assert params == expected, "the default scale must not change any value"


def test_real_params_valid_at_every_scale(repo_root, raw):
    scales = raw.get("scales") or {}
    assert "paper" in scales, "params.yaml should define the paper scale"
    for name, overrides in scales.items():
        params = load(repo_root / "params.yaml", name)
        assert params["scale"] == name
        for dotted, value in (overrides or {}).items():
            assert _get(params, dotted) == value, f"scales.{name}: {dotted} not applied"
    # resolve() works on a copy: the source dict is untouched
    before = copy.deepcopy(raw)
    resolve(raw, "paper")
    assert raw == before


def test_scale_key_in_file_is_used(raw):
    params = copy.deepcopy(raw)
    params["scale"] = "paper"
    resolved = resolve(params)
    assert resolved["scale"] == "paper"
    for dotted, value in (raw["scales"]["paper"] or {}).items():
        assert _get(resolved, dotted) == value


# --- bad values, each naming its key ---------------------------------------------------------

@pytest.mark.parametrize("bad", [1.2, 0, -0.5, 1.0])
def test_Lh_outside_open_unit_interval(raw, bad):
    params = copy.deepcopy(raw)
    idx = len(params["synthetic"]["Lh"]) - 1
    params["synthetic"]["Lh"][idx] = bad
    _rejects(params, f"synthetic.Lh[{idx}]")


def test_grid_k_below_one(raw):
    params = copy.deepcopy(raw)
    params["synthetic"]["grid"]["k"][0] = 0
    _rejects(params, "synthetic.grid.k[0]")


@pytest.mark.parametrize("bad", [0, 1.5, -0.1])
def test_grid_lam_outside_zero_one(raw, bad):
    params = copy.deepcopy(raw)
    idx = len(params["synthetic"]["grid"]["lam"]) - 1
    params["synthetic"]["grid"]["lam"][idx] = bad
    _rejects(params, f"synthetic.grid.lam[{idx}]")


def test_grid_lam_one_is_allowed(raw):
    params = copy.deepcopy(raw)
    params["synthetic"]["grid"]["lam"] = [0.5, 1.0]
    validate(resolve(params))


@pytest.mark.parametrize("key", ["forward", "dynamics"])
def test_unknown_solver_lists_valid_names(raw, key):
    params = copy.deepcopy(raw)
    params["synthetic"][key]["solver"] = "newton"
    message = _rejects(params, f"synthetic.{key}.solver", "newton")
    for name in SOLVERS:
        if key == "forward" and name in LINEAR_SOLVERS:
            assert name not in message, f"{name!r} solves linear systems only:\n{message}"
        else:
            assert name in message, f"valid solver {name!r} not listed:\n{message}"


def test_gmres_is_refused_as_a_forward_solver(raw):
    params = copy.deepcopy(raw)
    params["ablations"]["runs"]["mdeq"]["f_solver"] = "gmres"
    _rejects(params, "ablations.runs.mdeq.f_solver", "'gmres'")
    params["ablations"]["runs"]["mdeq"] = {"b_solver": "gmres"}  # a backward solver it is
    resolve(params)


# --- training runs: defaults deep-merged with one entry ------------------------------------

def test_a_run_model_block_changes_only_the_keys_it_names(raw):
    params = resolve(raw)
    run = study_run(params, "ablations", "no_dropout")
    defaults = params["ablations"]["defaults"]
    assert run["model"] == {**defaults["model"], "dropout": 0.0}
    assert {k: v for k, v in run.items() if k != "model"} == \
        {k: v for k, v in defaults.items() if k != "model"}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_unknown_run_key_names_the_run(raw):
    params = copy.deepcopy(raw)
    params["ablations"]["runs"]["sgd"]["epoch"] = 3
    _rejects(params, "ablations.runs.sgd", "epoch")


@pytest.mark.parametrize("model, fragments", [
    ({"widths": [8]}, ["ablations.runs.mdeq.model", "widths"]),
    ({"preset": "huge"}, ["ablations.runs.mdeq.model.preset", "huge", "large_cifar"]),
    ({"dropout": 1.5}, ["ablations.runs.mdeq.model.dropout", "1.5"]),
])
def test_bad_model_block_is_refused_before_any_job(raw, model, fragments):
    params = copy.deepcopy(raw)
    params["ablations"]["runs"]["mdeq"]["model"] = model
    _rejects(params, *fragments)


@pytest.mark.parametrize("study, run, changes, fragments", [
    ("ablations", "sgd", {"estimator": "bptt"}, ["diagnostics_every: 40", "'bptt'"]),
    ("vision", "cifar10_large_upg", {"estimator": "unrolled", "diagnostics_every": 0},
     ["spectral_batches: 1", "'unrolled'"]),
    ("lm", "postln_upg_jr_f14", {"estimator": "bptt", "diagnostics_every": 0},
     ["jacobian_reg.weight", "'bptt'"]),
    ("ablations", "sgd", {"momentum": 0.0, "nesterov": True}, ["nesterov", "momentum > 0"]),
    ("ablations", "sgd", {"lr_decay_epochs": [1]}, ["lr_decay_epochs: [1]", "'cosine'"]),
    ("graph", "mutag_upg_clean", {"b_solver": "gmres"}, ["stop_mode='inf'", "'gmres'"]),
])
def test_combinations_that_would_fail_inside_a_job_are_refused_first(raw, study, run, changes,
                                                                     fragments):
    params = copy.deepcopy(raw)
    params[study]["runs"][run].update(changes)
    _rejects(params, f"{study}.runs.{run}", *fragments)


def test_unknown_task_lists_the_valid_ones(raw):
    params = copy.deepcopy(raw)
    params["ablations"]["runs"]["mdeq"]["task"] = "text"
    _rejects(params, "ablations.runs.mdeq.task", "'text'", "image")


def test_validation_imports_no_torch(repo_root):
    """The Snakefile validates params.yaml in its own process, before any job, with the
    configurations and names of ``deq.config`` and the task names: never torch, whose
    import was half of every `snakemake` call. The registries that do need torch hold the
    same solver and task names."""
    code = ("import sys; from pipeline.config import load; load('params.yaml'); "
            "load('params.yaml', 'paper'); print(sorted({m.split('.')[0] for m in sys.modules} "
            "& {'torch', 'numpy', 'mlflow'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
    from pipeline.deq.config import SOLVER_NAMES
    from pipeline.experiments.tasks import TASK_NAMES, get_task
    assert sorted(SOLVERS) == sorted(SOLVER_NAMES)
    assert {name: get_task(name).name for name in TASK_NAMES} == {n: n for n in TASK_NAMES}


def test_train_config_defaults_are_the_params_yaml_defaults(raw):
    """Dataclass defaults must not contradict params.yaml, the one source of truth."""
    import dataclasses

    from pipeline.experiments.train_config import TrainConfig
    defaults = raw["ablations"]["defaults"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(defaults) == set(fields), set(defaults) ^ set(fields)
    built = TrainConfig()
    for key, value in defaults.items():
        assert getattr(built, key) == value, key
    assert TrainConfig.from_params(study_run(resolve(raw), "ablations", "mdeq")) == built


def test_synthetic_config_defaults_are_the_params_yaml_defaults(raw):
    """SyntheticConfig's defaults must not contradict params.yaml, the one source of truth."""
    from pipeline.experiments.synthetic import SyntheticConfig
    for Lh in raw["synthetic"]["Lh"]:
        assert SyntheticConfig.from_params(Lh, resolve(raw)["synthetic"]) == SyntheticConfig(Lh=Lh)
    paper = SyntheticConfig.from_params(0.9, resolve(raw, "paper")["synthetic"])
    assert (paper.pairs, paper.device, paper.batch_lams) == (50000, "cuda", True)


@pytest.mark.parametrize("dotted, bad", [("synthetic.weight", "orthogonal"),
                                         ("synthetic.device", "gpu"),
                                         ("synthetic.dynamics.layout", "all"),
                                         ("synthetic.dynamics.seeds", []),
                                         ("synthetic.u_scale", 0)])
def test_bad_synthetic_choices_name_their_key(raw, dotted, bad):
    params = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    _get(params, ".".join(parents))[leaf] = bad
    _rejects(params, dotted)


def test_unknown_top_level_key(raw):
    params = copy.deepcopy(raw)
    params["synthetc"] = {"pairs": 3}
    _rejects(params, "synthetc")


def test_unknown_nested_key(raw):
    params = copy.deepcopy(raw)
    params["synthetic"]["forward"]["tolerance"] = 1e-6
    _rejects(params, "synthetic.forward", "tolerance")


def test_missing_required_key(raw):
    params = copy.deepcopy(raw)
    del params["synthetic"]["grid"]["lam"]
    _rejects(params, "synthetic.grid", "lam")


def test_wrong_type(raw):
    params = copy.deepcopy(raw)
    params["synthetic"]["pairs"] = "many"
    _rejects(params, "synthetic.pairs")


@pytest.mark.parametrize("dotted", ["synthetic.nope", "nothere.pairs", "synthetic.pairs.deeper"])
def test_scale_override_naming_no_key(raw, dotted):
    params = copy.deepcopy(raw)
    params["scales"]["paper"] = {**(params["scales"]["paper"] or {}), dotted: 1}
    _rejects(params, "scales.paper", dotted, scale="paper")


def test_scale_override_with_bad_value_is_validated(raw):
    params = copy.deepcopy(raw)
    params["scales"]["paper"] = {**(params["scales"]["paper"] or {}), "synthetic.pairs": 0}
    _rejects(params, "synthetic.pairs", scale="paper")
    # ... and on a default run too, which does not apply it: a typo in a scale is named
    # before anyone switches to that scale
    _rejects(params, "synthetic.pairs", "scales.paper", scale="default")


def test_unknown_scale(raw):
    message = _rejects(copy.deepcopy(raw), "huge", scale="huge")
    assert "default" in message and "paper" in message, message


# --- CLI and Snakefile ---------------------------------------------------------------------

def _write_bad(raw: dict, path: Path) -> str:
    """params.yaml with the last L_h set to 1.2; returns the key the error must name."""
    params = copy.deepcopy(raw)
    idx = len(params["synthetic"]["Lh"]) - 1
    params["synthetic"]["Lh"][idx] = 1.2
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return f"synthetic.Lh[{idx}]"


def test_cli_validate(raw, repo_root, venv_bin, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    key = _write_bad(raw, bad)
    proc = subprocess.run([str(venv_bin / "python"), "-m", "pipeline", "validate", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    # the valid file, in-process (the same main() the CLI calls)
    args = argparse.Namespace(params=str(repo_root / "params.yaml"), scale="paper", show=False)
    assert config_main(args) == 0
    assert "valid (scale paper)" in capsys.readouterr().out


@pytest.fixture()
def workflow_copy(repo_root, tmp_path) -> Path:
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(repo_root / name, tmp_path / name)
    for name in ("workflow", "profiles"):
        shutil.copytree(repo_root / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", ".snakemake"))
    return tmp_path


def _snakemake_dry(venv_bin, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([str(venv_bin / "snakemake"), "-n", "figures"], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_snakemake_rejects_bad_params_before_any_job(raw, venv_bin, workflow_copy):
    key = _write_bad(raw, workflow_copy / "params.yaml")
    proc = _snakemake_dry(venv_bin, workflow_copy)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert key in out, out
    assert "Building DAG" not in out, "validation must fail before the DAG is planned"
    for folder in ("results", "logs", "mlruns", "figures", "benchmarks"):
        assert not (workflow_copy / folder).exists(), f"{folder}/ created by a failed validation"


# --- bad values that once slipped through (issue 15): each as `snakemake -n figures` on a
# copy of the workflow whose params.yaml has one value changed

def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if ".snakemake" not in p.relative_to(root).parts}


def _edit_text(text: str, pattern: str, replacement: str) -> str:
    import re
    edited, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
    assert count == 1, f"{pattern!r} not found in params.yaml"
    return edited


BAD_EDITS = {
    # an integer-valued float, once accepted and then a TypeError in the job
    "float_epochs": (r"^(    epochs:) 3\b", r"\1 3.0", ["ablations.defaults.epochs", "3.0",
                                                        "integer"]),
    "repeated_Lh": (r"^(  Lh:) \[0\.9, ", r"\1 [0.9, 0.9, ", ["synthetic.Lh", "non-unique"]),
    "empty_root": (r"^(  root:) data\b", r'\1 ""', ["data.root", "empty"]),
    "outside_root": (r"^(  root:) data\b", r"\1 /tmp/phantom-data", ["data.root", "outside",
                                                                    "allow_outside_project"]),
    "yaml_syntax": (r"^(  root:) data\b", r"\1 [data", ["params.yaml, line", "column"]),
    "duplicate_key": (r"\Z", "scale: paper\n", ["duplicate key 'scale'", "params.yaml, line"]),
    "defaults_solver": (r"^(    f_solver:) broyden", r"\1 bogus",
                        ["ablations.defaults.f_solver", "'bogus'"]),
    "paper_typo": (r"^(    ablations\.defaults\.)epochs:", r"\1epoch:",
                   ["scales.paper", "'ablations.defaults.epoch'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_snakemake_names_the_bad_key_and_writes_nothing(case, venv_bin, workflow_copy):
    pattern, replacement, fragments = BAD_EDITS[case]
    path = workflow_copy / "params.yaml"
    path.write_text(_edit_text(path.read_text(), pattern, replacement))
    before = _files(workflow_copy)
    proc = _snakemake_dry(venv_bin, workflow_copy)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    for fragment in fragments:
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert "Traceback" not in out and "Building DAG" not in out, out
    assert _files(workflow_copy) == before, "a refused params.yaml wrote files"


def test_syntax_error_names_the_line_and_column(tmp_path, repo_root):
    from pipeline.config import read_params
    text = (repo_root / "params.yaml").read_text()
    line = text.splitlines().index(next(l for l in text.splitlines() if l.startswith("  root:")))
    path = tmp_path / "params.yaml"
    path.write_text(_edit_text(text, r"^(  root:) data\b", r"\1 [data"))
    with pytest.raises(ParamsError) as info:
        read_params(path)
    assert f"line {line + 2}" in str(info.value)  # the parser stops on the next line
    path.write_text("a: 1\nb:\n  c: 2\n  c: 3\n")
    with pytest.raises(ParamsError, match=r"line 4, column 3: duplicate key 'c' \(first at "
                                          r"line 3\)"):
        read_params(path)


def test_Lh_wildcards_are_one_to_one(venv_bin, workflow_copy):
    """0.9 and 0.9000001 once shared one folder; 0.9999999 and 1e-7 planned no job."""
    from pipeline.config import lh_wildcard
    values = [0.9, 0.9000001, 0.9999999, 1e-7, 0.5, 1 - 2 ** -52]
    wildcards = [lh_wildcard(v) for v in values]
    assert len(set(wildcards)) == len(values)
    assert all(float(w) == v and w.startswith("0.") and "e" not in w
               for w, v in zip(wildcards, values))
    path = workflow_copy / "params.yaml"
    path.write_text(_edit_text(path.read_text(), r"^(  Lh:) \[.*?\]",
                               r"\1 [0.9, 0.9000001, 0.9999999, 1.0e-7]"))
    proc = _snakemake_dry(venv_bin, workflow_copy)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for w in ("0.9", "0.9000001", "0.9999999", "0.0000001"):
        assert f"results/synthetic/Lh={w}/summary.json" in out, w


def test_outside_root_is_allowed_when_asked(raw, tmp_path):
    params = copy.deepcopy(raw)
    params["data"].update(root=str(tmp_path / "shared-data"), allow_outside_project=True)
    assert resolve(params)["data"]["root"] == str(tmp_path / "shared-data")
    params["data"]["root"] = "../elsewhere"
    params["data"]["allow_outside_project"] = False
    _rejects(params, "data.root", "'../elsewhere'", "outside")


def test_a_run_key_is_named_where_it_was_written(raw):
    params = copy.deepcopy(raw)
    params["ablations"]["runs"]["sgd"]["optimizer"] = "lbfgs"
    message = _rejects(params, "ablations.runs.sgd.optimizer")
    params = copy.deepcopy(raw)
    params["ablations"]["defaults"]["model"]["dropout"] = 1.5
    message = _rejects(params, "ablations.defaults.model.dropout")
    assert "runs." not in message, message


@pytest.mark.parametrize("dotted, bad", [
    ("lm.runs.postln_upg_jr_f14.jacobian_reg.freq", 1.5),
    ("lm.runs.postln_upg_jr_f14.jacobian_reg.wieght", 0.1),
    ("lm.runs.postln_npg_adaptive.adaptive_lam_every", -1),
    ("lm.defaults.model.preset", "huge"),
    ("lm.defaults.data.dataset", "digits"),
    ("data.wikitext103.sha256", "242ba0f2"),
])
def test_bad_lm_values_name_their_key(raw, dotted, bad):
    """The lm study's values are checked before any job starts, naming the key."""
    params = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    _get(params, ".".join(parents))[leaf] = bad
    _rejects(params, ".".join(parents[:3]) if parents[0] == "lm" else "data.wikitext103", leaf)
