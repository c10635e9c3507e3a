# The one place for config validation, wildcard constraints and input helpers.
import json
import os
import sys

from snakemake.settings.types import DeploymentMethod

from pipeline.config import ParamsError, load

try:
    PARAMS = load(config)  # params.yaml + --config overrides, scale applied, schema-validated
except ParamsError as err:
    sys.exit(f"{err}\nNo job was started. Fix params.yaml (schema: pipeline/schema/params.schema.json).")

# Rules call `python -m pipeline ...`. Under --sdm conda the rule's environment provides
# `python`; otherwise it must be the interpreter running Snakemake (the project's .venv),
# whether or not that environment was activated.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    os.environ.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
SCALE = PARAMS["scale"]
TRACKING = PARAMS["tracking"]
TRACKING_READY = "mlruns/.ready" if TRACKING["uri"] != "none" else []


wildcard_constraints:
    Lh=r"0\.[0-9]+",


def as_json(obj):
    """A params slice as one JSON CLI argument (quote it with {params.x:q})."""
    return json.dumps(obj, sort_keys=True)


def tracking_args():
    return (f"--tracking-uri {TRACKING['uri']} --artifacts {TRACKING['artifacts']}")


def job_tags(rule, **wildcards):
    return as_json({"rule": rule, "wildcards": ",".join(f"{k}={v}" for k, v in wildcards.items())})


def dataset_files(name):
    """The three files of data/<name>, ancient(): a `dvc pull` alone must not rerun consumers."""
    root = PARAMS["data"]["root"]
    return [ancient(f"{root}/{name}/{f}") for f in ("train.npz", "test.npz", "meta.json")]


def ablation_params(name):
    """ablations.defaults merged with ablations.runs.<name>: one job's whole configuration."""
    return {**PARAMS["ablations"]["defaults"], **PARAMS["ablations"]["runs"][name]}
