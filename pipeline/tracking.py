"""MLflow at the edge: the only module of the package that imports mlflow.

One experiment per study, one run per Snakemake job. Runs carry tags (git
commit, params hash, study, rule, wildcards, scale), the exact params slice they
used, and per-step curves logged in batches (``log_batch``, at most 1000 entries
a call).

The store is created once, before parallel jobs start, by::

    python -m pipeline init-tracking --uri sqlite:///mlruns/mlflow.db \
        --artifacts mlruns/artifacts --experiments synthetic ablations --touch mlruns/.ready

Each study's runs sit under one parent run per scale (``<study> (<scale>)``, tags
``pipeline.role = parent`` and ``scale``), made when the study's first job at that scale
starts: a default run, or a dry run, never makes a paper-scale parent. A parent's status
sums up its children: RUNNING while one of them runs, then FAILED if one failed (a
divergence or a killed job) and FINISHED otherwise, its end time the last child's; a job
that never ran is not in it, so a parent whose report job never ran still says what did. Experiments are tagged
``mlflow.experimentKind = custom_model_development``, so MLflow 3's UI opens them in
its model-training view. Browse with ``make ui``.

``uri = "none"`` turns tracking off (a :class:`NullRun` records nothing).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from pipeline.signals import uninterrupted

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

MAX_BATCH = 1000  # MLflow's cap on metric entries per log_batch call

# --- metric names: one name per quantity, the same in every study ------------------------
# MLflow's compare view lines runs up by name; curves.csv uses the same names as columns.
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
PRETRAINING = "train/pretraining"          # 1 on MDEQ's unrolled pretraining steps
SOLVER_NSTEPS = "solver/nsteps"            # forward solver steps (summed over layers)
SOLVER_REL_RESIDUAL = "solver/rel_residual"  # forward relative residual at h* (worst layer)
SOLVER_STOP_RESIDUAL = "solver/stop_residual"  # forward residual in the solver's stop norm
                                               # (rel, abs or inf: IGNN's max |change|)
SOLVER_NSTEPS_LAYER = "solver/nsteps_layer{layer}"  # a stack of implicit layers: each one's
SOLVER_STOP_RESIDUAL_LAYER = "solver/stop_residual_layer{layer}"  # steps and residual (1-based)
SOLVER_BACKWARD_REL_RESIDUAL = "solver/backward_rel_residual"  # implicit: the training
SOLVER_BACKWARD_NSTEPS = "solver/backward_nsteps"                # backward solve (worst layer)
TIME_FORWARD = "time/forward_s"            # training step: forward, loss included
TIME_BACKWARD = "time/backward_s"          # training step: loss.backward()
TIME_STEP = "time/step_s"                  # training step: forward + backward + optimizer
TIME_DIAGNOSTICS = "time/diagnostics_s"    # the diagnostics of a step, timed on their own
TIME_EPOCH = "time/epoch_s"                # an epoch's timed training steps (no diagnostics,
                                           # no memory-measured step)
MEMORY_STEP_PEAK = "memory/step_peak_mb"   # tensor memory of one training step
# Diagnostics (pipeline.experiments.diagnostics): the applied gradient against the
# reference, the exact implicit gradient at the h* the forward solver found (GMRES, float64).
GRAD_COS = "grad/cos_sim"                  # whole model
GRAD_COS_PART = "grad/cos_sim_{part}"      # part in F, injection, head
GRAD_NORM_L1 = "grad/norm_l1"              # the applied gradient
GRAD_REF_NORM_L1 = "grad/ref_norm_l1"
GRAD_REF_REL_RESIDUAL = "grad/ref_rel_residual"  # worst sample, worst layer
GRAD_REF_NSTEPS = "grad/ref_nsteps"
GRAD_REF_CONVERGED = "grad/ref_converged"  # 1: met its tolerance and replayed F matched
GRAD_REF_REPLAY_MISMATCH = "grad/ref_replay_mismatch"  # ||F64(h*) - F(h*)|| / ||F(h*)||
FORWARD_CONVERGED = "solver/converged"     # 1: forward residual met f_tol at this h*
TIME_GRAD = "time/grad_s"                  # h* -> parameter gradients, this estimator
TIME_GRAD_IMPLICIT = "time/grad_implicit_s"  # same, implicit with the run's b_thres
GRAD_SPEEDUP = "time/grad_speedup_vs_implicit"
GRAD_IMPLICIT_REL_RESIDUAL = "grad/implicit_rel_residual"  # that implicit backward solve's
GRAD_IMPLICIT_CONVERGED = "grad/implicit_converged"        # residual (worst layer); 1: met b_tol
RHO = "spectral/rho"                       # rho(dF/dh) at h*, power method
RHO_LAMBDA = "spectral/rho_lambda"         # rho(dF_lam/dh), F_lam = (1-lam) I + lam F
RHO_ITERS = "spectral/rho_iters"
RHO_SETTLED = "spectral/rho_settled"
RHO_LAMBDA_ITERS = "spectral/rho_lambda_iters"
RHO_LAMBDA_SETTLED = "spectral/rho_lambda_settled"
RHO_CHANGE = "spectral/rho_change"         # the last power step's largest relative change
RHO_LAMBDA_CHANGE = "spectral/rho_lambda_change"
# Jacobian regularization (pipeline.deq.jacobian) and adaptive damping, per training step
JR_VALUE = "train/jr_value"                # Hutchinson ||dF/dh||_F^2 / numel at h* (steps it applies)
JR_WEIGHT = "train/jr_weight"              # the penalty's weight at this step (0 where it does not apply)
TRAIN_LAM = "train/lam"                    # the damping the estimator used (adaptive: 1/rho(dF/dh))
TOKENS_PER_S = "time/tokens_per_s"         # language modelling: target tokens / step time
# Synthetic study (pipeline.experiments.synthetic). A quantity measured for several methods
# carries the method as a suffix, method_metric(GRAD_COS, "broyden") = "grad/cos_sim/broyden":
# curves over k for the (k, lambda) grid (methods upg_lam0.5, npg_lam1, ...), over backward
# steps for appendix Fig. 1 (methods broyden, phantom; medians over pairs and W seeds).
GRAD_NORM_L2 = "grad/norm_l2"
BACKWARD_OBJECTIVE = "backward/objective"  # ||(I - J^T) g - dL/dh||
BACKWARD_REL_ERROR = "backward/rel_error"  # the objective over ||g||
BACKWARD_MIN_OBJECTIVE = "backward/min_objective_rel"      # min over steps / the start (g = 0)
BACKWARD_FINAL_OBJECTIVE = "backward/final_objective_rel"  # last step / the start
BACKWARD_ABOVE_START = "backward/pairs_above_start"        # pairs whose last step ends above it
BACKWARD_L1_OVER_EXACT = "backward/max_l1_over_exact"      # max over steps and pairs
BACKWARD_COS_SIGN_CHANGES = "backward/cos_slope_sign_changes"  # median over pairs
RHO_MIN = "spectral/rho_min"               # the smallest rho(dF/dh) at h* over pairs
TIME_PAIR = "time/pair_s"                  # seconds per (u, y) pair of the (k, lambda) grid
TIME_DYNAMICS = "time/dynamics_s"          # the backward-solver dynamics, all W seeds


def method_metric(name: str, method: str) -> str:
    """A quantity measured for several methods: ``grad/cos_sim/broyden``."""
    return f"{name}/{method}"


def eval_metric(name: str) -> str:
    """Per-evaluation metric, e.g. ``eval/acc``."""
    return f"eval/{name}"


def best_eval_metric(name: str) -> str:
    return f"eval/best_{name}"


def protocol_metric(protocol: str, stat: str) -> str:
    """A job parent's score over its folds or seeds, e.g. ``official/mean``, ``clean/std``."""
    return f"{protocol}/{stat}"


def train_metric(name: str) -> str:
    """A task's per-step training metric, e.g. ``train/acc``."""
    return f"train/{name}"


def flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists are JSON-encoded."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def git_commit() -> str:
    """HEAD's commit, with '-dirty' when the package has uncommitted changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


_STORE_SECONDS = [0.0]


def store_seconds() -> float:
    """Wall seconds this process has spent in MLflow store calls (the tracking overhead)."""
    return _STORE_SECONDS[0]


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """Every MLflow store call goes through here. SQLite allows one writer, so a concurrent
    job may find the database locked for a moment: retry. A SIGTERM or SIGINT waits until
    the call returns, so no transaction is left open holding the lock (``signals``)."""
    start = time.perf_counter()
    try:
        for attempt in range(attempts):
            try:
                with uninterrupted():
                    return fn(*args, **kwargs)
            except Exception as err:  # mlflow wraps sqlite's OperationalError in its own types
                if "locked" not in str(err).lower() or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * 2 ** attempt)
    finally:
        _STORE_SECONDS[0] += time.perf_counter() - start


def _artifact_location(artifacts: str, experiment: str) -> str:
    return Path(artifacts, experiment).resolve().as_uri()


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PARENT_ROLE = ("pipeline.role", "parent")


def init_store(uri: str, artifacts: str, experiments: Sequence[str]) -> dict[str, str]:
    """Create the store (schema migrations run here, once) and the experiments; the parent
    runs come with their first child (:func:`parent_run`). Returns experiment ids."""
    if uri == "none":
        return {}
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    ids = {}
    for name in experiments:
        exp = _retry(client.get_experiment_by_name, name)
        ids[name] = exp.experiment_id if exp else _retry(
            client.create_experiment, name, artifact_location=_artifact_location(artifacts, name))
        _retry(client.set_experiment_tag, ids[name], *EXPERIMENT_KIND)
    return ids


def parent_run(client, experiment_id: str, study: str, scale: str) -> str:
    """The id of the study's parent run at ``scale``, made if missing (by the study's first
    job at that scale), and RUNNING: a child is about to start. Two jobs that make one at
    once both keep the earliest; the other is deleted before any child names it."""
    query = (f"tags.`{PARENT_ROLE[0]}` = '{PARENT_ROLE[1]}' and tags.scale = '{scale}'")

    def earliest():
        runs = _retry(client.search_runs, [experiment_id], query,
                      order_by=["attributes.start_time ASC"], max_results=10)
        return runs[0].info.run_id if runs else None

    found = earliest()
    if found:
        _retry(client.update_run, found, status="RUNNING")
        return found
    tags = {"mlflow.runName": f"{study} ({scale})", PARENT_ROLE[0]: PARENT_ROLE[1],
            "scale": scale, "study": study}
    mine = _retry(client.create_run, experiment_id, tags=tags).info.run_id
    first = earliest()
    if first != mine:
        _retry(client.delete_run, mine)
    return first


def conclude_parent(client, parent_id: str | None) -> None:
    """Sum up a parent's children in its status: left RUNNING while a child runs, else
    FAILED if a child failed (or was killed), FINISHED otherwise; the end time is now, when
    its last child ended."""
    if not parent_id:
        return
    exp_id = _retry(client.get_run, parent_id).info.experiment_id
    children = _retry(client.search_runs, [exp_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    statuses = {r.info.status for r in children}
    if "RUNNING" in statuses:
        return
    _retry(client.set_terminated, parent_id,
           "FAILED" if statuses & {"FAILED", "KILLED"} else "FINISHED")


def job_runs(client, experiment_id: str, **search) -> list:
    """The experiment's job runs, without the parent runs."""
    runs = _retry(client.search_runs, [experiment_id], **search)
    return [r for r in runs if r.data.tags.get(PARENT_ROLE[0]) != PARENT_ROLE[1]]


class NullRun:
    """Tracking switched off: same interface, records nothing."""

    run_id = None

    def log_params(self, params: Mapping) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...
    def log_curves(self, curves: Mapping[str, Sequence[float]], steps: Sequence[int]) -> None: ...
    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_dataset(self, name: str, sha256: str, source: str, contexts: Sequence[str]) -> None: ...
    def fail(self, reason: str) -> None: ...

    def last_step(self, key: str) -> int | None:
        """The highest step logged for metric ``key``; None if none (or tracking is off)."""
        return None


# What this process has logged as dataset inputs, (run id, name, sha256), and each run's
# parent: a job's folds or seeds, run in one process, log their parents' input once.
_LOGGED_INPUTS: set[tuple[str, str, str]] = set()
_PARENT_OF: dict[str, str | None] = {}


class Run(NullRun):
    """An open MLflow run; metrics go out in batches of at most 1000 entries."""

    def __init__(self, client, run_id: str, batch_size: int = MAX_BATCH):
        self.client, self.run_id = client, run_id
        self.batch_size = min(batch_size, MAX_BATCH)

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param
        flat = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        existing = _retry(self.client.get_run, self.run_id).data.params
        flat = [p for p in flat if p.key not in existing]  # a resumed run keeps its params
        for i in range(0, len(flat), 100):
            _retry(self.client.log_batch, self.run_id, params=flat[i:i + 100])

    def _log_entries(self, entries: list) -> None:
        for i in range(0, len(entries), self.batch_size):
            _retry(self.client.log_batch, self.run_id, metrics=entries[i:i + self.batch_size])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._log_entries([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_curves(self, curves: Mapping[str, Sequence[float]], steps: Sequence[int]) -> None:
        """Each curve is a per-step metric series (values[i] at steps[i]); NaN entries are skipped."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        entries = [Metric(name, float(v), now, int(s))
                   for name, values in curves.items() for s, v in zip(steps, values)
                   if v == v]
        self._log_entries(entries)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        _retry(self.client.log_artifact, self.run_id, str(path), subdir)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            _retry(self.client.set_tag, self.run_id, key, str(value))

    def log_dataset(self, name: str, sha256: str, source: str, contexts: Sequence[str]) -> None:
        """The run's dataset as one MLflow dataset input (the runs table's Dataset column):
        its name, digest (the first 32 hex digits of ``sha256``: MLflow's digest field holds
        36 characters; the whole in the input's ``sha256`` tag) and source, with the splits
        it serves joined as its context (e.g. ``train+test``). One input, not one per split:
        MLflow's store keeps one input per (name, digest) and run, dropping the rest.

        The runs above it (a job's run of folds, the study's parent) get the input too: the
        runs list shows a study's parent with its jobs folded in, so the parent's Dataset
        cell names every dataset its jobs used. A resumed run logs it again; the store keeps
        the first."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        dataset = Dataset(name=name, digest=sha256[:32], source_type="local",
                          source=json.dumps({"uri": source}))
        tags = [InputTag("mlflow.data.context", "+".join(contexts)), InputTag("sha256", sha256)]
        run_id = self.run_id
        while run_id:
            if (run_id, name, sha256) not in _LOGGED_INPUTS:  # a job's folds share parents
                _retry(self.client.log_inputs, run_id, datasets=[DatasetInput(dataset, tags)])
                _LOGGED_INPUTS.add((run_id, name, sha256))
            if run_id not in _PARENT_OF:
                _PARENT_OF[run_id] = _retry(self.client.get_run, run_id).data.tags.get(
                    "mlflow.parentRunId")
            run_id = _PARENT_OF[run_id]

    def last_step(self, key: str) -> int | None:
        history = _retry(self.client.get_metric_history, self.run_id, key)
        return max((m.step for m in history), default=None)

    def fail(self, reason: str) -> None:
        self.set_tags({"failure_reason": reason[:5000]})
        _retry(self.client.set_terminated, self.run_id, "FAILED")
        self._terminated = True


@contextmanager
def start_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
              params: Mapping, artifacts: str = "mlruns/artifacts", run_id: str | None = None,
              batch_size: int = MAX_BATCH, system_metrics_s: float = 0.0) -> Iterator[NullRun]:
    """Open (or, with ``run_id``, resume) a run; it ends FINISHED, or FAILED on an exception.

    The experiment should exist (``init_store``); if not, it is created here. With a
    ``scale`` tag, a new run is a child of the study's parent run for that scale (a
    resumed run keeps its parent). ``system_metrics_s`` > 0 samples the machine every that
    many seconds into ``system/*`` metrics (MLflow's monitor: CPU and memory through
    psutil, disk, network, and the GPU through nvidia-ml-py where it is installed and a GPU
    is visible; the ``system_metrics`` tag says which). The monitor is a thread: a SIGTERM,
    raised in the main thread, never cuts one of its writes; it is stopped and flushed when
    the run ends, however it ends.
    """
    if uri == "none":
        yield NullRun()
        return
    client = _client(uri)
    if run_id is None:
        exp = _retry(client.get_experiment_by_name, experiment)
        if exp is None:
            exp_id = init_store(uri, artifacts, [experiment])[experiment]
        else:
            exp_id = exp.experiment_id
        tags = {"mlflow.runName": run_name, "git_commit": git_commit(), **tags}
        if tags.get("scale") and "mlflow.parentRunId" not in tags:  # under the study's parent
            tags["mlflow.parentRunId"] = parent_run(client, exp_id, experiment, tags["scale"])
        run_id = _retry(client.create_run, exp_id, tags={k: str(v) for k, v in tags.items()},
                        run_name=run_name).info.run_id
    else:
        _retry(client.update_run, run_id, status="RUNNING")
        if "failure_reason" in _retry(client.get_run, run_id).data.tags:  # an earlier, killed attempt's
            _retry(client.delete_tag, run_id, "failure_reason")
    run = Run(client, run_id, batch_size)
    run.log_params(params)
    monitor = _system_monitor(run, uri, system_metrics_s)
    parent = _retry(client.get_run, run_id).data.tags.get("mlflow.parentRunId")
    _PARENT_OF[run_id] = parent
    if parent:
        _retry(client.update_run, parent, status="RUNNING")
    try:
        yield run
    except BaseException as err:
        if not getattr(run, "_terminated", False):
            run.fail(f"{type(err).__name__}: {err}")
        raise
    else:
        if not getattr(run, "_terminated", False):
            _retry(client.set_terminated, run_id, "FINISHED")
    finally:
        if monitor is not None:
            monitor.finish()
        conclude_parent(client, parent)


def _system_monitor(run: "Run", uri: str, every_s: float):
    """Start MLflow's system-metrics monitor on ``run`` (None when ``every_s`` is 0); tag
    what it measures."""
    if not every_s:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=every_s, tracking_uri=uri,
                                   resume_logging=run.last_step("system/cpu_utilization_percentage")
                                   is not None)
    gpu = any(type(m).__name__ == "GPUMonitor" for m in monitor.monitors)
    run.set_tags({"system_metrics": f"cpu, memory, disk, network every {every_s:g} s; GPU: "
                  + ("on (nvidia-ml-py)" if gpu else "off (no nvidia-ml-py or no GPU)")})
    monitor.start()
    return monitor


def add_run_arguments(parser) -> None:
    """The tracking flags of every tracked command (the rules pass them via tracking_args())."""
    parser.add_argument("--tracking-uri", default="none", help="MLflow store; none = off")
    parser.add_argument("--tracking-batch-size", type=int, default=MAX_BATCH,
                        help="metric entries per log_batch call (at most 1000)")
    parser.add_argument("--artifacts", default="mlruns/artifacts")
    parser.add_argument("--tags", default="{}", help="extra MLflow tags, JSON (rule, wildcards)")
    parser.add_argument("--system-metrics", type=float, default=0.0,
                        help="sample CPU, memory (and GPU) every N seconds; 0 = off")


def add_arguments(parser) -> None:
    parser.add_argument("--uri", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--touch", help="marker file written once the store is ready")


def main(args) -> int:
    ids = init_store(args.uri, args.artifacts, args.experiments)
    print(f"MLflow store {args.uri}: experiments {ids} (parent runs come with their first job)")
    if args.touch:
        from pipeline.io import write_json
        write_json({"uri": args.uri, "experiments": ids}, args.touch)
    return 0


# --- parent and child runs: one job that trains several folds or seeds ------------------------

JOB_PARENT_ROLE = "parent"


def job_parent_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
                   params: Mapping, artifacts: str = "mlruns/artifacts",
                   batch_size: int = MAX_BATCH) -> NullRun:
    """Find the run of a job that trains several units (by its ``study``, ``scale`` and
    ``run`` tags) or create it, under the study's parent for that scale; it is left RUNNING
    (conclude it with :func:`finish_parent`). Its children are the job's folds or seeds,
    each its own run tagged ``mlflow.parentRunId``: study (scale) > job > fold or seed."""
    if uri == "none":
        return NullRun()
    client = _client(uri)
    exp = _retry(client.get_experiment_by_name, experiment)
    exp_id = exp.experiment_id if exp else init_store(uri, artifacts, [experiment])[experiment]
    query = " and ".join(f"tags.{k} = '{tags[k]}'" for k in ("study", "scale", "run")) + \
        f" and tags.role = '{JOB_PARENT_ROLE}'"
    found = _retry(client.search_runs, [exp_id], query, max_results=1)
    if found:
        run_id = found[0].info.run_id
        _retry(client.update_run, run_id, status="RUNNING")
    else:
        all_tags = {"mlflow.runName": run_name, "git_commit": git_commit(),
                    "role": JOB_PARENT_ROLE, **tags}
        if tags.get("scale"):
            all_tags["mlflow.parentRunId"] = parent_run(client, exp_id, experiment, tags["scale"])
        run_id = _retry(client.create_run, exp_id, tags={k: str(v) for k, v in all_tags.items()},
                        run_name=run_name).info.run_id
    run = Run(client, run_id, batch_size)
    run.set_tags({"git_commit": git_commit()})
    run.log_params(params)
    return run


def child_runs(uri: str, parent: NullRun) -> dict[str, str]:
    """{run name: run id} of the children of ``parent``."""
    if uri == "none" or parent.run_id is None:
        return {}
    client = _client(uri)
    exp_id = _retry(client.get_run, parent.run_id).info.experiment_id
    runs = _retry(client.search_runs, [exp_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    return {r.info.run_name: r.info.run_id for r in runs}


def delete_runs(uri: str, run_ids) -> None:
    """Delete runs (a rerun job's stale children), so each fold or seed has one run."""
    if uri == "none":
        return
    client = _client(uri)
    for run_id in run_ids:
        _retry(client.delete_run, run_id)


def finish_parent(parent: NullRun, status: str = "FINISHED") -> None:
    """Conclude a job's parent run (its folds or seeds), then sum up the study's parent."""
    if parent.run_id is not None:
        _retry(parent.client.set_terminated, parent.run_id, status)
        conclude_parent(parent.client,
                        _retry(parent.client.get_run, parent.run_id).data.tags.get(
                            "mlflow.parentRunId"))
