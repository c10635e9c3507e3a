# The one place for config validation, wildcard constraints and input helpers.
import json
import os
import sys

from snakemake.settings.types import DeploymentMethod

from pipeline.config import (
    LH_PATTERN,
    TRAIN_STUDIES,
    ParamsError,
    lh_wildcard,
    load,
    study_run,
)

try:
    PARAMS = load(
        config
    )  # params.yaml + --config overrides, scale applied, schema-validated
except ParamsError as err:
    sys.exit(
        f"{err}\nNo job was started. Fix params.yaml (schema: pipeline/schema/params.schema.json)."
    )

# Rules call `python -m pipeline ...`. Under --sdm conda the rule's environment provides
# `python`; otherwise it must be the interpreter running Snakemake (the project's .venv),
# whether or not that environment was activated.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    os.environ.update(
        PATH=os.pathsep.join(
            [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
        )
    )
SCALE = PARAMS["scale"]
TRACKING = PARAMS["tracking"]
TRACKING_READY = "mlruns/.ready" if TRACKING["uri"] != "none" else []


wildcard_constraints:
    Lh=LH_PATTERN,


def as_json(obj):
    """A params slice as one JSON CLI argument (quote it with {params.x:q})."""
    return json.dumps(obj, sort_keys=True)


def tracking_args():
    return (
        f"--tracking-uri {TRACKING['uri']} --artifacts {TRACKING['artifacts']}"
        f" --tracking-batch-size {TRACKING['batch_size']}"
        f" --system-metrics {TRACKING['system_metrics_s']}"
    )


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
    return (
        f"--timeout {d['timeout_s']} --deadline {d['deadline_s']}"
        f" --min-rate {d['min_rate_bytes_per_s']} --rate-window {d['rate_window_s']}"
    )


# {"<rule>/<benchmark file stem>": threads} of the jobs whose rule sets threads per job
# (the vision study's torchrun jobs): the run-time table counts each job's own threads.
JOB_THREADS = {}


def rule_threads():
    """{rule: threads} of the rules with a fixed thread count, plus JOB_THREADS (the
    run-time table)."""
    threads = {
        r.name: r.resources["_cores"]
        for r in workflow.rules
        if isinstance(r.resources.get("_cores"), int)
    }
    return {**threads, **JOB_THREADS}


def job_tags(rule, **wildcards):
    return as_json(
        {"rule": rule, "wildcards": ",".join(f"{k}={v}" for k, v in wildcards.items())}
    )


GRAPH_DATASETS = (
    "mutag",
    "chains",
    "cox2",
    "proteins",
    "ppi",
)  # pipeline/data/graphs.py layout
IMAGEFOLDER_DATASETS = (
    "digits_imagefolder",
    "imagenet",
)  # a manifest of an ImageFolder tree
LM_DATASETS = ("wiki_excerpt", "wikitext103")  # pipeline/data/wikitext.py layout


def dataset_files(name):
    """The files of data/<name>, ancient(): a `dvc pull` alone must not rerun consumers.
    Image datasets: train.npz, test.npz, meta.json; graph datasets: graphs.npz, meta.json;
    ImageFolder trees: manifest.json (written last, after the tree); corpora:
    train/valid/test.npz, vocab.txt, meta.json."""
    root = PARAMS["data"]["root"]
    if name in LM_DATASETS:
        files = ("train.npz", "valid.npz", "test.npz", "vocab.txt", "meta.json")
    elif name in GRAPH_DATASETS:
        files = ("graphs.npz", "meta.json")
    elif name in IMAGEFOLDER_DATASETS:
        files = ("manifest.json",)
    else:
        files = ("train.npz", "test.npz", "meta.json")
    return [ancient(f"{root}/{name}/{f}") for f in files]


# --- training studies: one job per entry of <study>.runs, all through `python -m pipeline train`
# A study's training job is declared with these helpers and the wildcard {run}, as in
#     input: unpack(train_inputs(STUDY)), output: results/STUDY/{run}/{metrics.json,curves.csv,model.pt},
#     params: **train_params(STUDY, "rule_name"), resources: **job_resources(STUDY), shell: TRAIN_SHELL
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
    return lambda wc: {
        "data": dataset_files(run_config(study, wc.run)["data"]["dataset"]),
        "tracking": ancient(TRACKING_READY),
    }


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


def run_gpus(run):
    """GPUs of one training job: one per rank (nproc_per_node, torchrun) on CUDA, none on the CPU."""
    return int(run.get("nproc_per_node", 1)) if run["device"].startswith("cuda") else 0


def job_resources(study, gpu=None):
    """A study job's `resources:` for a cluster executor (profiles/slurm), from params.yaml's
    cluster.<study> at the chosen scale. gpu: from the run's device (run_gpus), or given. The
    SLURM plugin asks for cpus_per_gpu x GPUs on a GPU job and for `threads` on a CPU job.
    """
    c = PARAMS["cluster"][study]
    if gpu is None:
        gpu = lambda wc: run_gpus(run_config(study, wc.run))
    return {
        "gpu": gpu,
        "cpus_per_gpu": c["cpus_per_gpu"],
        "mem_mb": c["mem_mb"],
        "runtime": c["runtime_min"],
    }


def train_nproc(study):
    return lambda wc: run_config(study, wc.run).get("nproc_per_node", 1)


def train_launcher(study):
    """The command that starts a run: `python -m pipeline train` for one process, else
    torchrun with nproc_per_node ranks on this node, OMP_NUM_THREADS and MKL_NUM_THREADS set
    to each rank's share, max(1, threads // ranks) (Snakemake sets them to the job's
    threads, and every rank would inherit that). `--threads` gets the job's threads, which
    the entry point divides by the ranks."""

    def launcher(wildcards, threads):
        nproc = run_config(study, wildcards.run).get("nproc_per_node", 1)
        if nproc == 1:
            return "python -m pipeline train"
        per_rank = max(1, threads // nproc)
        return (
            f"OMP_NUM_THREADS={per_rank} MKL_NUM_THREADS={per_rank} torchrun --standalone"
            f" --nproc_per_node={nproc} -m pipeline train"
        )

    return launcher


TRAIN_ARGS = (
    "--study {params.study} --name {wildcards.run}"
    " --params {params.run:q} --data {params.data_dir:q} --out {params.out:q}"
    " --checkpoints checkpoints --scale {params.scale} {params.tracking}"
    " --tags {params.tags:q} --threads {threads} > {log} 2>&1"
)
TRAIN_SHELL = " ".join(["python -m pipeline train", TRAIN_ARGS])
# The same, started by params.launcher (train_launcher): one process or torchrun.
LAUNCHED_TRAIN_SHELL = " ".join(["{params.launcher}", TRAIN_ARGS])
# The same flags for a run whose folds or seeds are trained in one job (IGNN's studies).
REPEATS_SHELL = " ".join(["python -m pipeline train-repeats", TRAIN_ARGS])


def report_failed_runs():
    """Name the runs whose results say "failed" (a divergence): their job exited 0, and its
    own output went to its log, so this is where a user sees them. For onsuccess/onerror.
    """
    failed = []
    for study in TRAIN_STUDIES:
        for name in run_names(study):
            path = f"results/{study}/{name}/metrics.json"
            if os.path.exists(path):
                try:
                    with open(path) as handle:
                        metrics = json.load(handle)
                except (
                    OSError,
                    ValueError,
                ) as err:  # not ours: results are written atomically
                    failed.append(f"  {study}/{name}: unreadable {path}: {err}")
                    continue
                if metrics.get("status") == "failed":
                    failed.append(f"  {study}/{name}: {metrics.get('reason', '')}")
                for unit in (
                    metrics.get("failed", [])
                    if metrics.get("status") != "failed"
                    else []
                ):
                    failed.append(f"  {study}/{name}/{unit['unit']}: {unit['reason']}")
    if failed:
        print(
            f"{len(failed)} run(s) FAILED (diverged; recorded, not a crash: see the tables"
            " and MLflow):\n" + "\n".join(failed),
            file=sys.stderr,
        )
