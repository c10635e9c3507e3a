# The one place for config validation, wildcard constraints and input helpers.
import json
import sys

from snakemake.settings.types import DeploymentMethod

from pipeline.config import ParamsError, load

try:
    PARAMS = load(config)  # params.yaml + --config overrides, scale applied, schema-validated
except ParamsError as err:
    sys.exit(f"{err}\nNo job was started. Fix params.yaml (schema: pipeline/schema/params.schema.json).")

# Under --sdm conda the rule's environment provides `python`; otherwise the interpreter running Snakemake.
PYTHON = ("python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
          else sys.executable)
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
