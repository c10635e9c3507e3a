"""pipeline/tracking.py: one SQLite store shared by parallel jobs, failure, resume, off switch.

The store is created once by ``init_store`` (as the ``init_tracking`` rule does);
then jobs write into it concurrently, each from its own process.
"""
from __future__ import annotations

import json
import math
import os
import re
import inspect
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.io import params_hash
from pipeline.tracking import NullRun, Run, init_store, start_run

N_JOBS = 8
N_STEPS = 1500  # > MLflow's 1000 metric entries per log_batch: needs two batches per curve

JOB = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import mlflow  # imported before the barrier, so that all writers start together
    from pipeline.tracking import start_run

    uri, artifacts, i, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    barrier = Path(sys.argv[6])
    params = {"job": i, "grid": {"k": [1, 2, 3], "lam": 0.5}}
    tags = {"study": "synthetic", "rule": "fake_job", "wildcards": f"i={i}",
            "params_hash": sys.argv[5]}
    steps = list(range(%(n)d))
    (barrier / f"ready{i}").touch()
    deadline = time.time() + 120
    while not (barrier / "go").exists() and time.time() < deadline:
        time.sleep(0.005)
    start = time.time()
    with start_run(uri, "parallel", f"job {i}", tags, params, artifacts) as run:
        run.log_curves({"loss": [i + 1.0 / (s + 1) for s in steps]}, steps)
        run.log_metrics({"final": float(i), "seconds": 0.5})
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"job": i}))
        run.log_artifact(out / "result.json")
    print(json.dumps({"run_id": run.run_id, "start": start, "end": time.time()}))
""") % {"n": N_STEPS}


def _client(uri):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory, venv_bin):
    """One store for the module, created once by ``python -m pipeline init-tracking`` (which
    calls ``init_store``), as the init_tracking rule does before parallel jobs start."""
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    artifacts = str(root / "mlruns" / "artifacts")
    marker = root / "mlruns" / "sub" / ".ready"
    proc = subprocess.run([str(venv_bin / "python"), "-m", "pipeline", "init-tracking",
                           "--uri", uri, "--artifacts", artifacts,
                           "--experiments", "synthetic", "ablations", "parallel",
                           "--touch", str(marker)], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri, artifacts, marker


@pytest.mark.slow
def test_parallel_jobs_share_one_store(store, tmp_path, repo_root, venv_bin):
    uri, artifacts, _ = store
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([str(venv_bin / "python"), str(script), uri, artifacts, str(i),
                               str(tmp_path / f"out{i}"), params_hash({"job": i}), str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=repo_root, env=env)
             for i in range(N_JOBS)]
    deadline = time.time() + 180
    while len(list(barrier.glob("ready*"))) < N_JOBS and time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a writer died before the barrier"
        time.sleep(0.01)
    (barrier / "go").touch()  # every writer is waiting: release them together
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    run_ids = {r["run_id"] for r in reports}
    assert len(run_ids) == N_JOBS
    # The writers competed: at one moment, all eight were inside their run at once.
    assert max(r["start"] for r in reports) < min(r["end"] for r in reports), reports

    client = _client(uri)
    exp = client.get_experiment_by_name("parallel")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert {r.info.run_id for r in runs} == run_ids
    for run in runs:
        assert run.info.status == "FINISHED", run.info
        i = int(run.data.params["job"])
        tags = run.data.tags
        assert tags["mlflow.runName"] == f"job {i}"
        assert tags["study"] == "synthetic" and tags["rule"] == "fake_job"
        assert tags["wildcards"] == f"i={i}"
        assert tags["params_hash"] == params_hash({"job": i})
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"]), tags["git_commit"]
        assert json.loads(run.data.params["grid.k"]) == [1, 2, 3]
        assert run.data.params["grid.lam"] == "0.5"
        assert run.data.metrics["final"] == float(i)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) == N_STEPS, len(history)
        by_step = {m.step: m.value for m in history}
        assert sorted(by_step) == list(range(N_STEPS))
        assert all(math.isclose(by_step[s], i + 1.0 / (s + 1)) for s in (0, 999, 1000, N_STEPS - 1))
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["result.json"]
    # the artifacts live under the experiment's folder of the configured artifact root
    assert sorted(p.name for p in Path(artifacts, "parallel").glob("*/artifacts/*")) == \
        ["result.json"] * N_JOBS


def test_exception_marks_run_failed(store):
    uri, artifacts, _ = store
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(uri, "synthetic", "failing", {"study": "synthetic"}, {"x": 1},
                       artifacts) as run:
            run.log_metrics({"before": 1.0})
            raise RuntimeError("boom")
    info = _client(uri).get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert "RuntimeError" in info.data.tags["failure_reason"]
    assert "boom" in info.data.tags["failure_reason"]
    assert info.data.metrics["before"] == 1.0


def test_sigterm_inside_a_store_call_waits_for_the_call(store, monkeypatch):
    """A SIGTERM that lands inside an MLflow write is raised when the write returns: the
    point is stored, no SQLite transaction is left holding the lock, and the run is marked
    FAILED at once (raised mid-call, it left the database locked for the retries' 25 s)."""
    import signal
    from pipeline import signals
    uri, artifacts, _ = store
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signals.install()
    try:
        with pytest.raises(signals.Terminated, match="stopped by SIGTERM"):
            with start_run(uri, "synthetic", "terminated", {}, {}, artifacts) as run:
                write = run.client.log_batch

                def killed_mid_write(*args, **kwargs):
                    os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line
                    return write(*args, **kwargs)

                monkeypatch.setattr(run.client, "log_batch", killed_mid_write)
                start = time.monotonic()
                run.log_metrics({"last": 1.0}, step=3)
                pytest.fail("the SIGTERM was not raised after the write")
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert time.monotonic() - start < 5
    info = _client(uri).get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags["failure_reason"] == "Terminated: stopped by SIGTERM"
    assert [m.step for m in _client(uri).get_metric_history(run.run_id, "last")] == [3]


def test_explicit_fail_is_not_overwritten(store):
    uri, artifacts, _ = store
    with start_run(uri, "synthetic", "diverged", {}, {}, artifacts) as run:
        run.fail("loss became NaN")
    info = _client(uri).get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags["failure_reason"] == "loss became NaN"


def test_resume_continues_the_same_run(store):
    uri, artifacts, _ = store
    params = {"model": {"width": 8}, "ks": [1, 2]}
    with pytest.raises(KeyboardInterrupt):
        with start_run(uri, "resume", "resumable", {"study": "ablations"}, params,
                       artifacts) as run:  # "resume" does not exist yet: start_run creates it
            run.log_curves({"loss": [float(s) for s in range(10)]}, list(range(10)))
            first_id = run.run_id
            raise KeyboardInterrupt  # a job killed by the scheduler
    client = _client(uri)
    assert client.get_run(first_id).info.status == "FAILED"

    # the same params (MLflow refuses a changed value for a logged key) plus one new key
    with start_run(uri, "resume", "resumable", {"study": "ablations"},
                   {**params, "resumed_from_step": 10}, artifacts, run_id=first_id) as run:
        assert run.run_id == first_id
        run.log_curves({"loss": [float(s) for s in range(10, 20)]}, list(range(10, 20)))

    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [first_id], "resume must not create a second run"
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.width": "8", "ks": "[1, 2]", "resumed_from_step": "10"}
    history = client.get_metric_history(first_id, "loss")
    assert sorted(m.step for m in history) == list(range(20))
    assert "failure_reason" not in run.data.tags, "the resumed, finished run keeps a stale failure"


def test_curves_skip_nan(store):
    uri, artifacts, _ = store
    with start_run(uri, "synthetic", "nan", {}, {}, artifacts) as run:
        run.log_curves({"c": [1.0, float("nan"), 3.0]}, [0, 1, 2])
    history = _client(uri).get_metric_history(run.run_id, "c")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (2, 3.0)]


def test_null_run_has_the_whole_run_interface():
    """Every public method of Run exists on NullRun with the same signature, so code written
    against a tracked run also runs with tracking off."""
    for name, member in vars(Run).items():
        if name.startswith("_") or not callable(member):
            continue
        assert name in vars(NullRun), f"NullRun lacks {name}"
        assert inspect.signature(member) == inspect.signature(getattr(NullRun, name)), name


def test_none_uri_gives_null_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with start_run("none", "synthetic", "off", {"study": "x"}, {"a": 1}) as run:
        assert isinstance(run, NullRun) and run.run_id is None
        (tmp_path / "f.txt").write_text("x")
        run.log_params({"b": 2})
        run.log_metrics({"m": 1.0})
        run.log_curves({"c": [1.0, 2.0]}, [0, 1])
        run.log_artifact(tmp_path / "f.txt")
        run.set_tags({"t": "1"})
        run.fail("nothing")
        assert run.last_step("c") is None  # nothing was logged, so a resume logs everything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"], "tracking off wrote files"
    assert init_store("none", "ignored", ["synthetic"]) == {}
    with pytest.raises(ValueError):  # errors still propagate with tracking off
        with start_run("none", "synthetic", "off", {}, {}):
            raise ValueError("x")


def test_init_tracking_cli(store):
    """The store fixture ran the CLI: marker written, experiments created where asked."""
    uri, artifacts, marker = store
    assert marker.is_file()
    ids = json.loads(marker.read_text())["experiments"]
    assert set(ids) == {"synthetic", "ablations", "parallel"}
    client = _client(uri)
    for name, exp_id in ids.items():
        exp = client.get_experiment_by_name(name)
        assert exp is not None and exp.experiment_id == exp_id
        assert exp.artifact_location == Path(artifacts, name).resolve().as_uri()
    # idempotent: a second call finds the same experiments (and adds a new one)
    again = init_store(uri, artifacts, ["synthetic", "ablations", "parallel", "extra"])
    assert {k: v for k, v in again.items() if k != "extra"} == ids
    assert "extra" in again and again["extra"] not in ids.values()


def test_a_dataset_input_goes_on_the_run_and_every_run_above_it(tmp_path, store_uri):
    """One input per run (MLflow keeps one per name and digest), its context the splits
    joined; the study's parent collects its jobs' datasets, once each, so the runs list,
    which folds the jobs under it, names them."""
    from pipeline.tracking import PARENT_ROLE
    uri, artifacts = store_uri, str(tmp_path / "artifacts")
    exp_id = init_store(uri, artifacts, ["study"])["study"]
    sha_a, sha_b = "a" * 64, "b" * 64
    with start_run(uri, "study", "x", {"scale": "default"}, {}, artifacts) as x:
        x.log_dataset("digits", sha_a, "data/digits", ["train", "test"])
    with start_run(uri, "study", "y", {"scale": "default"}, {}, artifacts) as y:
        y.log_dataset("digits", sha_a, "data/digits", ["train", "test"])
        y.log_dataset("chains", sha_b, "data/chains", ["train"])
    client = _client(uri)

    def inputs(run_id):
        return {(i.dataset.name, i.dataset.digest,
                 {t.key: t.value for t in i.tags}["mlflow.data.context"])
                for i in client.get_run(run_id).inputs.dataset_inputs}

    assert inputs(x.run_id) == {("digits", sha_a[:32], "train+test")}
    assert inputs(y.run_id) == {("digits", sha_a[:32], "train+test"),
                                ("chains", sha_b[:32], "train")}
    parent, = [r for r in client.search_runs([exp_id])
               if r.data.tags.get(PARENT_ROLE[0]) == PARENT_ROLE[1]]
    assert inputs(parent.info.run_id) == inputs(y.run_id)
    assert len(client.get_run(parent.info.run_id).inputs.dataset_inputs) == 2


def test_runs_sit_under_one_parent_per_study_and_scale(tmp_path, store_uri):
    """The store makes no parent; a study's first job at a scale makes that scale's parent,
    a later one finds it; a resumed run keeps its parent; a parent's status sums up its
    children (RUNNING while one runs, FAILED if one failed, else FINISHED); experiments open
    in MLflow 3's model-training view."""
    from pipeline.tracking import PARENT_ROLE, job_runs
    uri, artifacts = store_uri, str(tmp_path / "artifacts")
    exp_id = init_store(uri, artifacts, ["study"])["study"]
    init_store(uri, artifacts, ["study"])  # idempotent
    client = _client(uri)

    def parents():
        return {r.data.tags["scale"]: r for r in client.search_runs([exp_id])
                if r.data.tags.get(PARENT_ROLE[0]) == PARENT_ROLE[1]}

    assert parents() == {}, "no parent before a job of that scale"
    with start_run(uri, "study", "a", {"scale": "default"}, {}, artifacts) as a:
        assert parents()["default"].info.status == "RUNNING"
    assert set(parents()) == {"default"} and parents()["default"].info.status == "FINISHED"
    with pytest.raises(RuntimeError):
        with start_run(uri, "study", "b", {"scale": "paper"}, {}, artifacts) as b:
            raise RuntimeError("diverged")
    with start_run(uri, "study", "a", {"scale": "default"}, {}, artifacts, run_id=a.run_id):
        pass
    found = parents()
    assert {s: p.info.run_name for s, p in found.items()} == {
        "default": "study (default)", "paper": "study (paper)"}
    assert found["paper"].info.status == "FAILED" and found["paper"].info.end_time
    assert found["default"].info.status == "FINISHED"
    children = {r.info.run_name: r for r in job_runs(client, exp_id)}
    assert sorted(children) == ["a", "b"]
    for name, scale in (("a", "default"), ("b", "paper")):
        assert children[name].data.tags["mlflow.parentRunId"] == found[scale].info.run_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"


def test_system_metrics_sample_cpu_and_memory_and_say_the_gpu_is_off(tmp_path, store_uri):
    """tracking.system_metrics_s > 0 turns on MLflow's monitor for the run: system/* metrics
    (CPU and memory through psutil) and a tag that says whether the GPU part is on; with 0,
    the default scale's setting, nothing is sampled."""
    from pipeline.tracking import _client
    uri, artifacts = store_uri, str(tmp_path / "artifacts")
    init_store(uri, artifacts, ["study"])
    client = _client(uri)
    with start_run(uri, "study", "sampled", {}, {}, artifacts, system_metrics_s=0.2) as on:
        deadline = time.monotonic() + 30  # a hang guard: two samples take ~0.5 s when idle
        while (len(client.get_metric_history(on.run_id, "system/cpu_utilization_percentage"))
               < 2 and time.monotonic() < deadline):
            time.sleep(0.2)
    with start_run(uri, "study", "quiet", {}, {}, artifacts) as off:
        time.sleep(0.5)
    sampled = client.get_run(on.run_id).data
    assert "system/cpu_utilization_percentage" in sampled.metrics
    assert "system/system_memory_usage_megabytes" in sampled.metrics
    assert len(client.get_metric_history(on.run_id, "system/cpu_utilization_percentage")) >= 2
    gpu = torch_cuda_available()
    assert sampled.tags["system_metrics"].endswith(
        "on (nvidia-ml-py)" if gpu else "off (no nvidia-ml-py or no GPU)")
    quiet = client.get_run(off.run_id).data
    assert not any(k.startswith("system/") for k in quiet.metrics)
    assert "system_metrics" not in quiet.tags


def torch_cuda_available() -> bool:
    import importlib.util

    import torch
    return torch.cuda.is_available() and importlib.util.find_spec("pynvml") is not None
