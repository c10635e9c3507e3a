"""The ablation training entry point: determinism, resume after a kill, divergence, tracking."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.digits import export_digits
from pipeline.experiments.train import TrainConfig

TINY = {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 3, "eval_batch_size": 400,
        "f_max_iter": 8, "b_max_iter": 8, "pretrain_steps": 1, "pretrain_layers": 2,
        "diagnostics_every": 2, "diagnostics_b_max_iter": 20, "power_iters": 5}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    export_digits(out, 0.2, 0)
    return out


def train_cmd(name: str, params: dict, data: Path, out: Path, ckpt: Path, uri: str = "none"):
    return [sys.executable, "-m", "pipeline", "train", "--name", name,
            "--params", json.dumps(params), "--data", str(data), "--out", str(out),
            "--checkpoints", str(ckpt), "--tracking-uri", uri,
            "--artifacts", str(out.parent / "artifacts"), "--threads", "1"]


def run_train(*args, **kwargs) -> dict:
    cmd = train_cmd(*args, **kwargs)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(args[3]) / "metrics.json").read_text())


def comparable(metrics: dict) -> dict:
    """Everything but wall times and run ids."""
    drop = {"time_per_epoch_s", "mean_forward_s", "mean_backward_s", "mean_step_s",
            "peak_memory_mb", "mlflow_run_id", "history", "name",
            "backward_speedup_vs_implicit"}
    out = {k: v for k, v in metrics.items() if k not in drop}
    out["test_acc_by_epoch"] = [h["test_acc"] for h in metrics["history"]]
    return out


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown ablation keys \\['epoch'\\]"):
        TrainConfig.from_params({"epoch": 3})


def test_same_seed_same_metrics(digits, tmp_path):
    params = {**TINY, "estimator": "upg", "optimizer": "sgd", "lr": 0.1}
    a = run_train("a", params, digits, tmp_path / "a", tmp_path / "ck_a")
    b = run_train("b", params, digits, tmp_path / "b", tmp_path / "ck_b")
    assert a["status"] == "finished" and a["epochs_completed"] == 2
    assert comparable(a) == comparable(b)
    assert without_times(tmp_path / "a" / "curves.csv") == without_times(tmp_path / "b" / "curves.csv")
    # A different seed trains a different model.
    run_train("c", {**params, "seed": 1}, digits, tmp_path / "c", tmp_path / "ck_c")
    assert without_times(tmp_path / "c" / "curves.csv") != without_times(tmp_path / "a" / "curves.csv")


def without_times(path: Path):
    """The per-step curves without the wall-time columns (*_s, and the speedup made of them)."""
    import pandas as pd
    frame = pd.read_csv(path)
    return frame[[c for c in frame.columns if not c.endswith("_s") and c != "backward_speedup"]].fillna("nan").to_dict("list")


def test_resume_after_kill_continues_the_same_run(digits, tmp_path):
    """SIGKILL after the first epoch's checkpoint; the rerun resumes and matches an uninterrupted run."""
    from mlflow.tracking import MlflowClient
    params = {**TINY, "epochs": 3, "estimator": "npg", "optimizer": "sgd", "lr": 0.1}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from pipeline.tracking import init_store
    init_store(uri, str(tmp_path / "artifacts"), ["ablations"])
    ckpt_root = tmp_path / "ck"
    cmd = train_cmd("resume", params, digits, tmp_path / "out", ckpt_root, uri)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(ckpt_root.glob("resume/*/last.pt")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before a checkpoint: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "metrics.json").exists()

    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 3
    assert not list(ckpt_root.glob("resume/*/last.pt")), "a concluded run keeps no checkpoint"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablations")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the resumed job must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == metrics["mlflow_run_id"]
    assert len(client.get_metric_history(runs[0].info.run_id, "test_acc")) == 3

    straight = run_train("straight", params, digits, tmp_path / "straight", tmp_path / "ck2")
    assert comparable(straight)["test_acc_by_epoch"] == comparable(metrics)["test_acc_by_epoch"]
    assert straight["best_test_acc"] == metrics["best_test_acc"]


def test_divergence_is_recorded_as_failed(digits, tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = {**TINY, "estimator": "implicit", "pretrain_steps": 0, "diverge_residual": 1e-12}
    metrics = run_train("diverge", params, digits, tmp_path / "out", tmp_path / "ck", uri)
    assert metrics["status"] == "failed"
    assert "forward residual" in metrics["reason"] and "> 1e-12" in metrics["reason"]
    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == metrics["reason"]


def test_tracked_run_has_curves_tags_and_params(digits, tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = {**TINY, "epochs": 1, "estimator": "upg", "optimizer": "sgd", "lr": 0.1}
    metrics = run_train("tracked", params, digits, tmp_path / "out", tmp_path / "ck", uri)
    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow_run_id"])
    for tag in ("git_commit", "params_hash", "dataset", "scale", "ablation"):
        assert tag in run.data.tags
    assert run.data.tags["dataset"] == "digits"
    assert run.data.params["ablation.k"] == "5"          # the resolved config, defaults included
    assert run.data.params["ablation.estimator"] == "upg"
    steps = TINY["max_steps_per_epoch"]
    for key in ("loss", "train_acc", "lr", "forward_steps", "step_s", "forward_s", "backward_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == steps, key
    # pretraining steps run no solver, so they have no residual
    residuals = client.get_metric_history(run.info.run_id, "forward_rel_residual")
    assert [m.step for m in residuals] == list(range(TINY["pretrain_steps"], steps))
    cos = client.get_metric_history(run.info.run_id, "grad_cosine")
    assert len(cos) == len(range(0, steps, TINY["diagnostics_every"]))
    # the first step is pretraining (unrolled) — afterwards UPG: cosines are proper cosines
    assert all(-1.0 <= m.value <= 1.0 + 1e-6 for m in cos)
    for key in ("rho_dF_dh", "rho_dFlam_dh", "grad_norm_used", "grad_norm_exact", "test_acc",
                "backward_speedup", "grad_used_s", "grad_implicit_s",
                "peak_memory_mb"):
        assert client.get_metric_history(run.info.run_id, key), key


def test_one_epoch_on_cifar_format_data(tmp_path):
    """The CIFAR code path: the test archive in the true format, exported by the real rule's
    code, then one (short) epoch of training at 32x32x3."""
    from test_data_download import make_cifar_archive, md5

    from pipeline.data.cifar10 import prepare_cifar10
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(archive)
    data = tmp_path / "cifar10"
    prepare_cifar10(data, url="http://127.0.0.1:9/unused", md5=md5(archive), archive=archive)
    params = {**TINY, "epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "dataset": "cifar10",
              "estimator": "upg", "optimizer": "sgd", "lr": 0.1}
    metrics = run_train("cifar", params, data, tmp_path / "out", tmp_path / "ck")
    assert metrics["status"] == "finished" and metrics["dataset"] == "cifar10"
    assert metrics["trainable_params"] == 158_986  # MDEQ-Tiny at 32x32x3, 10 classes
    assert metrics["steps"] == 2 and metrics["final_test_acc"] is not None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_fails_clearly(digits, tmp_path):
    proc = subprocess.run(train_cmd("gpu", {**TINY, "device": "cuda"}, digits, tmp_path / "out",
                                    tmp_path / "ck"), capture_output=True, text=True)
    assert proc.returncode == 1
    assert "device='cuda' but no CUDA device is visible" in proc.stderr
    assert not (tmp_path / "out").exists()
