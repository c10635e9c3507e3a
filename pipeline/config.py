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
import json
import re
from decimal import Decimal
from importlib import resources
from pathlib import Path

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


# JSON Schema counts 3.0 as an integer; a run would then fail on it (range(3.0)). Here an
# integer is an int, and `epochs: 3.0` is refused before any job, naming the key.
Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)))


# --- reading params.yaml strictly --------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a repeated key in one mapping is an error."""


def _strict_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1}); "
                "the last value would silently win", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_params(path: str | Path) -> dict:
    """Parse a params file strictly: a syntax error or a duplicate key raises ParamsError
    naming the file, the line and the column."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ParamsError(f"invalid {path.name}:\n  {where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"invalid {path.name}:\n  {path}: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"invalid {path.name}:\n  {path}: expected a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def validate(params: dict, project: str | Path | None = None) -> None:
    """Raise ParamsError for the first schema violations, each naming its key.

    ``project``: the folder paths in params are relative to (default: the working
    directory, the repository root under Snakemake)."""
    errors = sorted(Validator(schema()).iter_errors(params),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{_dotted(e.absolute_path)}: {e.message}" for e in errors[:10]]
        raise ParamsError("invalid params.yaml:\n  " + "\n  ".join(lines))
    _check_semantics(params)
    _check_data_root(params["data"], Path(project or Path.cwd()))


def lh_wildcard(value: float) -> str:
    """The L_h wildcard of results/synthetic/Lh=<w>/: the shortest decimal that reads back as
    ``value``, without an exponent (1e-07 -> 0.0000001), so distinct values get distinct
    folders and the wildcard pattern ``0.<digits>`` holds every value in (0, 1)."""
    return format(Decimal(repr(float(value))), "f")


LH_PATTERN = r"0\.[0-9]+"


def _check_data_root(data: dict, project: Path) -> None:
    root = data["root"]
    if not root.strip():
        raise ParamsError("invalid params.yaml:\n  data.root: '' is empty; datasets would be "
                          "written at the file system root. Use a folder, e.g. data")
    resolved, project = (project / root).resolve(), project.resolve()
    if resolved == project:
        raise ParamsError(f"invalid params.yaml:\n  data.root: {root!r} is the project folder "
                          "itself; use a sub-folder, e.g. data")
    if not resolved.is_relative_to(project) and not data["allow_outside_project"]:
        raise ParamsError(f"invalid params.yaml:\n  data.root: {root!r} is outside the project "
                          f"({project}); set data.allow_outside_project: true to use it (a "
                          "cluster's shared data folder)")


# Top-level blocks that are training studies: {defaults, runs}, one job per run.
TRAIN_STUDIES = ("ablations", "graph", "node", "vision", "lm")


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
    from pipeline.deq.config import ESTIMATORS, LINEAR_SOLVERS, SOLVER_NAMES
    from pipeline.experiments.tasks import TASK_NAMES
    from pipeline.experiments.train_config import TrainConfig

    def check(key: str, value: str, valid) -> None:
        if value not in valid:
            raise ParamsError(f"invalid params.yaml:\n  {key}: {value!r} is not one of {sorted(valid)}")

    forward_solvers = sorted(set(SOLVER_NAMES) - set(LINEAR_SOLVERS))
    syn = params.get("synthetic", {})
    if syn:
        check("synthetic.forward.solver", syn["forward"]["solver"], forward_solvers)
        check("synthetic.dynamics.solver", syn["dynamics"]["solver"], SOLVER_NAMES)
        for i, value in enumerate(syn["Lh"]):
            wildcard = lh_wildcard(value)
            if not re.fullmatch(LH_PATTERN, wildcard) or float(wildcard) != value:
                raise ParamsError(f"invalid params.yaml:\n  synthetic.Lh[{i}]: {value!r} cannot "
                                  f"be named by a folder Lh=0.<digits>")
    full = schema()
    run_schema = {**full["$defs"]["run"], "$defs": full["$defs"]}
    for study in TRAIN_STUDIES:
        for name in params.get(study, {}).get("runs", {}):
            merged = study_run(params, study, name)
            for err in Validator(run_schema).iter_errors(merged):
                where = _origin(params, study, name, list(err.absolute_path))
                raise ParamsError(f"invalid params.yaml:\n  {where}: {err.message}")
            checks = (("task", TASK_NAMES), ("estimator", ESTIMATORS), ("f_solver", forward_solvers),
                      ("b_solver", SOLVER_NAMES))
            for key, valid in checks:
                if key in merged:
                    check(_origin(params, study, name, [key]), merged[key], valid)
            try:
                TrainConfig.from_params(merged)
            except ValueError as err:
                raise ParamsError(f"invalid params.yaml:\n  {study}.runs.{name}: {err}") from None
            data = merged.get("data", {})
            if merged.get("task") == "imagefolder" and data["resize"] < data["crop"]:
                raise ParamsError(f"invalid params.yaml:\n  {_origin(params, study, name, ['data', 'resize'])}: "
                                  f"{data['resize']} is smaller than data.crop {data['crop']} "
                                  "(validation resizes, then centre-crops)")


def _origin(params: dict, study: str, name: str, path: list) -> str:
    """The key where a merged run's value was written: the run's own entry, or the defaults."""
    node = params[study]["runs"][name]
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _dotted([study, "defaults", *path])
        node = node[part]
    return _dotted([study, "runs", name, *path])


def resolve(params: dict, scale: str | None = None, project: str | Path | None = None) -> dict:
    """Apply ``scales.<scale>`` (dotted keys) to a copy of params; validate the result.

    Every other scale is validated too, so a typo in ``scales.paper`` is named on a
    default run, not only once someone switches to the paper scale."""
    scale = scale or params.get("scale", "default")
    scales = params.get("scales") or {}
    if scale != "default" and scale not in scales:
        raise ParamsError(f"invalid params.yaml:\n  scale: {scale!r} is not one of "
                          f"{['default', *sorted(scales)]}")
    resolved = _apply_scale(params, scale)
    validate(resolved, project)
    for other in ["default", *scales]:
        if other != scale:
            try:
                validate(_apply_scale(params, other), project)
            except ParamsError as err:
                raise ParamsError(f"{err}\n  (with scales.{other} applied; every scale is "
                                  "checked on every run)") from None
    return resolved


def _apply_scale(params: dict, scale: str) -> dict:
    params = copy.deepcopy(params)
    scales = params.get("scales") or {}
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
    return params


def load(source: str | Path | dict, scale: str | None = None) -> dict:
    """Read (if a path, strictly: see :func:`read_params`), resolve the scale and validate."""
    if not isinstance(source, dict):
        source = read_params(source)
    return resolve(source, scale)


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
