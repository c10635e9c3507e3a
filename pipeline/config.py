"""params.yaml: schema validation and scale resolution.

The Snakefile calls :func:`load` on its config before any job is planned. Bad
values raise :class:`ParamsError` naming the key, e.g.
``synthetic.Lh[2]: 1.2 is greater than or equal to the maximum of 1``.

Scales: the values in params.yaml are the default scale; ``scales.<name>`` maps
dotted keys to the values that change at that scale. ``scale: paper`` (or
``--config scale=paper``) applies them.

    python -m pipeline validate params.yaml [--scale paper] [--show]
"""
from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ParamsError(ValueError):
    """params.yaml is invalid; the message names the offending key."""


def schema() -> dict:
    text = resources.files("pipeline").joinpath("schema/params.schema.json").read_text()
    return json.loads(text)


def _dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def validate(params: dict) -> None:
    """Raise ParamsError for the first schema violations, each naming its key."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(params), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{_dotted(e.absolute_path)}: {e.message}" for e in errors[:10]]
        raise ParamsError("invalid params.yaml:\n  " + "\n  ".join(lines))
    _check_semantics(params)


# Top-level blocks that are training studies: {defaults, runs}, one job per run.
TRAIN_STUDIES = ("ablations",)


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, recursively for dicts: a run's ``model:`` block changes
    only the keys it names."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def study_run(params: dict, study: str, name: str) -> dict:
    """One job's whole configuration: ``<study>.defaults`` deep-merged with ``runs.<name>``."""
    block = params[study]
    if name not in block["runs"]:
        raise ParamsError(f"invalid params.yaml:\n  {study}.runs: no run {name!r}; runs: "
                          f"{sorted(block['runs'])}")
    return deep_merge(block["defaults"], block["runs"][name])


def _check_semantics(params: dict) -> None:
    """Checks a JSON schema cannot express: names that must exist in the package registries."""
    from pipeline.deq import ESTIMATORS, LINEAR_SOLVERS, SOLVERS
    from pipeline.experiments.tasks import TASKS

    def check(key: str, value: str, valid) -> None:
        if value not in valid:
            raise ParamsError(f"invalid params.yaml:\n  {key}: {value!r} is not one of {sorted(valid)}")

    forward_solvers = sorted(set(SOLVERS) - set(LINEAR_SOLVERS))
    syn = params.get("synthetic", {})
    if syn:
        check("synthetic.forward.solver", syn["forward"]["solver"], forward_solvers)
        check("synthetic.dynamics.solver", syn["dynamics"]["solver"], SOLVERS)
    full = schema()
    run_schema = {**full["$defs"]["run"], "$defs": full["$defs"]}
    for study in TRAIN_STUDIES:
        for name in params.get(study, {}).get("runs", {}):
            merged = study_run(params, study, name)
            where = f"{study}.runs.{name}"
            for err in jsonschema.Draft202012Validator(run_schema).iter_errors(merged):
                raise ParamsError(f"invalid params.yaml:\n  {where}.{_dotted(err.absolute_path)}: "
                                  f"{err.message} (after merging with {study}.defaults)")
            checks = (("task", TASKS), ("estimator", ESTIMATORS), ("f_solver", forward_solvers),
                      ("b_solver", SOLVERS))
            for key, valid in checks:
                if key in merged:
                    check(f"{where}.{key}", merged[key], valid)


def resolve(params: dict, scale: str | None = None) -> dict:
    """Apply ``scales.<scale>`` (dotted keys) to a copy of params; validate the result."""
    params = copy.deepcopy(params)
    scale = scale or params.get("scale", "default")
    scales = params.get("scales", {})
    if scale != "default" and scale not in scales:
        raise ParamsError(f"invalid params.yaml:\n  scale: {scale!r} is not one of "
                          f"{['default', *sorted(scales)]}")
    for dotted, value in (scales.get(scale) or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"invalid params.yaml:\n  scales.{scale}: {dotted!r} names no "
                                  "key of params.yaml")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"invalid params.yaml:\n  scales.{scale}: {dotted!r} names no key "
                              "of params.yaml")
        node[leaf] = value
    params["scale"] = scale
    validate(params)
    return params


def load(source: str | Path | dict, scale: str | None = None) -> dict:
    """Read (if a path), resolve the scale and validate."""
    if not isinstance(source, dict):
        source = yaml.safe_load(Path(source).read_text())
    return resolve(source, scale)


def params_hash(slice_: Any) -> str:
    """Short stable hash of a params slice (tags every MLflow run)."""
    blob = json.dumps(slice_, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def add_arguments(parser) -> None:
    parser.add_argument("params", nargs="?", default="params.yaml")
    parser.add_argument("--scale", default=None, help="override params.yaml's scale")
    parser.add_argument("--show", action="store_true", help="print the resolved params")


def main(args) -> int:
    try:
        params = load(args.params, args.scale)
    except ParamsError as err:
        print(err)
        return 1
    if args.show:
        print(yaml.safe_dump(params, sort_keys=False))
    print(f"{args.params}: valid (scale {params['scale']})")
    return 0
