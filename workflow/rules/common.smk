# The one place for config validation, wildcard constraints and input helpers.
import json
import os
import sys

from snakemake.settings.types import DeploymentMethod

from pipeline.config import LH_PATTERN, TRAIN_STUDIES, ParamsError, lh_wildcard, load, study_run

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
    Lh=LH_PATTERN,


def as_json(obj):
    """A params slice as one JSON CLI argument (quote it with {params.x:q})."""
    return json.dumps(obj, sort_keys=True)


def tracking_args():
    return (f"--tracking-uri {TRACKING['uri']} --artifacts {TRACKING['artifacts']}"
            f" --tracking-batch-size {TRACKING['batch_size']}")


TU_NAMES = {"cox2": "COX2", "proteins": "PROTEINS"}


def tu_param(wildcards, key):
    """data.tu's URL pattern, mirror, local archive or sha256 for one TU dataset."""
    tu, name = PARAMS["data"]["tu"], TU_NAMES[wildcards.tu]
    if key == "sha256":
        return tu["sha256"][name] or ""
    if key == "archive":
        return f"{tu['archive']}/{name}.zip" if tu["archive"] else ""
    return tu[key].replace("{name}", name) if tu[key] else ""


def download_limits():
    """params.yaml's data.download as the flags of `python -m pipeline data ...`."""
    d = PARAMS["data"]["download"]
    return (f"--timeout {d['timeout_s']} --deadline {d['deadline_s']}"
            f" --min-rate {d['min_rate_bytes_per_s']} --rate-window {d['rate_window_s']}")


def rule_threads():
    """{rule: threads} of the rules with a fixed thread count (the run-time table)."""
    return {r.name: r.resources["_cores"] for r in workflow.rules
            if isinstance(r.resources.get("_cores"), int)}


def job_tags(rule, **wildcards):
    return as_json({"rule": rule, "wildcards": ",".join(f"{k}={v}" for k, v in wildcards.items())})


GRAPH_DATASETS = ("mutag", "chains", "cox2", "proteins", "ppi")  # pipeline/data/graphs.py layout
LM_DATASETS = ("wiki_excerpt", "wikitext103")  # pipeline/data/wikitext.py layout


def dataset_files(name):
    """The files of data/<name>, ancient(): a `dvc pull` alone must not rerun consumers.
    Image datasets: train.npz, test.npz, meta.json; graph datasets: graphs.npz, meta.json;
    corpora: train/valid/test.npz, vocab.txt, meta.json."""
    root = PARAMS["data"]["root"]
    if name in LM_DATASETS:
        files = ("train.npz", "valid.npz", "test.npz", "vocab.txt", "meta.json")
    elif name in GRAPH_DATASETS:
        files = ("graphs.npz", "meta.json")
    else:
        files = ("train.npz", "test.npz", "meta.json")
    return [ancient(f"{root}/{name}/{f}") for f in files]


# --- training studies: one job per entry of <study>.runs, all through `python -m pipeline train`
# A study's training job is declared with these helpers and the wildcard {run}, as in
#     input: unpack(train_inputs(STUDY)), output: results/STUDY/{run}/{metrics.json,curves.csv,model.pt},
#     params: **train_params(STUDY, "rule_name"), resources: gpu=train_gpu(STUDY), shell: TRAIN_SHELL
# Each job's params are its own merged run, so editing one entry reruns only that job (and
# what reads its results); editing <study>.defaults reruns them all.


def run_config(study, name):
    """<study>.defaults deep-merged with <study>.runs.<name>: one job's whole configuration."""
    return study_run(PARAMS, study, name)


def run_names(study):
    return list(PARAMS[study]["runs"])


def run_data_dir(run):
    return f"{PARAMS['data']['root']}/{run['data']['dataset']}"


def train_inputs(study):
    return lambda wc: {"data": dataset_files(run_config(study, wc.run)["data"]["dataset"]),
                       "tracking": ancient(TRACKING_READY)}


def train_params(study, rule):
    return {
        "study": study,
        "run": lambda wc: as_json(run_config(study, wc.run)),
        "data_dir": lambda wc: run_data_dir(run_config(study, wc.run)),
        "out": lambda wc: f"results/{study}/{wc.run}",
        "scale": SCALE,
        "tracking": tracking_args(),
        "tags": lambda wc: job_tags(rule, run=wc.run),
    }


def train_gpu(study, gpus=1):
    """The `gpu` resource of a run: ``gpus`` on a CUDA device, 0 on the CPU."""
    return lambda wc: gpus * int(run_config(study, wc.run)["device"].startswith("cuda"))


TRAIN_ARGS = (
    "--study {params.study} --name {wildcards.run}"
    " --params {params.run:q} --data {params.data_dir:q} --out {params.out:q}"
    " --checkpoints checkpoints --scale {params.scale} {params.tracking}"
    " --tags {params.tags:q} --threads {threads} > {log} 2>&1"
)
TRAIN_SHELL = " ".join(["python -m pipeline train", TRAIN_ARGS])
# The same flags for a run whose folds or seeds are trained in one job (IGNN's studies).
REPEATS_SHELL = " ".join(["python -m pipeline train-repeats", TRAIN_ARGS])


def report_failed_runs():
    """Name the runs whose results say "failed" (a divergence): their job exited 0, and its
    own output went to its log, so this is where a user sees them. For onsuccess/onerror."""
    failed = []
    for study in TRAIN_STUDIES:
        for name in run_names(study):
            path = f"results/{study}/{name}/metrics.json"
            if os.path.exists(path):
                with open(path) as handle:
                    metrics = json.load(handle)
                if metrics.get("status") == "failed":
                    failed.append(f"  {study}/{name}: {metrics.get('reason', '')}")
                for unit in metrics.get("failed", []) if metrics.get("status") != "failed" else []:
                    failed.append(f"  {study}/{name}/{unit['unit']}: {unit['reason']}")
    if failed:
        print(f"{len(failed)} run(s) FAILED (diverged; recorded, not a crash: see the tables"
              " and MLflow):\n" + "\n".join(failed), file=sys.stderr)
