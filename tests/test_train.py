"""The shared training loop: tasks, determinism, resume, divergence, tracking, diagnostics.

Most tests call the real entry point in-process (``pipeline.cli.main``, the code the
CLI runs); the resume test kills a real subprocess.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import tracking as M
from pipeline.cli import main as cli_main
from pipeline.tracking import job_runs
from pipeline.data.digits import export_digits
from pipeline.experiments import tasks as task_registry
from pipeline.experiments.vision_tasks import ImageTask
from pipeline.experiments.checkpoint import load_checkpoint
from pipeline.experiments.train_config import TrainConfig

TINY = {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 3, "eval_batch_size": 400,
        "f_max_iter": 8, "b_max_iter": 8, "pretrain_steps": 1, "model": {"num_layers": 2},
        "diagnostics_every": 0, "power_iters": 5}
TIMES = (M.TIME_FORWARD, M.TIME_BACKWARD, M.TIME_STEP, M.TIME_DIAGNOSTICS, M.TIME_GRAD,
         M.TIME_GRAD_IMPLICIT, M.GRAD_SPEEDUP, M.MEMORY_STEP_PEAK)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The digits with 5% held out (90 test images): every evaluation of the module's
    runs is a quarter of the default split's (360), the path the same."""
    out = tmp_path_factory.mktemp("data") / "digits"
    export_digits(out, 0.05, 0)
    return out


@pytest.fixture(scope="module")
def digits_default_split(tmp_path_factory) -> Path:
    """The default split (20% held out), on which the refactor baseline was recorded and on
    whose first batch the float32 Broyden backward meets b_tol 1e-4."""
    out = tmp_path_factory.mktemp("data") / "digits"
    export_digits(out, 0.2, 0)
    return out


def argv(name: str, params: dict, data: Path, out: Path, ckpt: Path, uri: str = "none"):
    return ["train", "--study", "ablations", "--name", name, "--params", json.dumps(params),
            "--data", str(data), "--out", str(out), "--checkpoints", str(ckpt),
            "--tracking-uri", uri, "--artifacts", str(out.parent / "artifacts"), "--threads", "1"]


def run_train(name, params, data, out, ckpt, uri="none") -> dict:
    assert cli_main(argv(name, params, data, out, ckpt, uri)) == 0
    return json.loads((out / "metrics.json").read_text())


def curves(out: Path, keep=None) -> dict:
    """The per-step curves without wall times and memory (and only ``keep``, if given)."""
    frame = pd.read_csv(out / "curves.csv")
    cols = [c for c in frame.columns if c not in TIMES and (keep is None or c in keep)]
    return frame[cols].fillna("nan").to_dict("list")


def comparable(metrics: dict) -> dict:
    drop = {"time_per_epoch_s", "mean_forward_s", "mean_backward_s", "mean_step_s",
            "peak_memory_mb", "mlflow_run_id", "history", "name", "diagnostics", "git_commit",
            "tracking_s"}
    out = {k: v for k, v in metrics.items() if k not in drop}
    out["eval_by_epoch"] = [h["acc"] for h in metrics["history"]]
    return out


# --- config and registry ---------------------------------------------------------------------

def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown run keys \\['epoch'\\]"):
        TrainConfig.from_params({"epoch": 3})


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'text'; valid tasks: \[.graph., .image., .imagefolder., .lm., .node.\]"):
        TrainConfig.from_params({"task": "text"})


def test_unknown_model_key_is_rejected(digits):
    with pytest.raises(ValueError, match=r"unknown MDEQ model keys \['width'\]"):
        task_registry.get_task("image")({"width": 3}, {"dataset": "digits"}, digits, "cpu", 8, 8, 0)
    with pytest.raises(ValueError, match="in_channels"):  # the dataset sets it
        task_registry.get_task("image")({"in_channels": 3}, {}, digits, "cpu", 8, 8, 0)


def test_image_task_batches_split_the_global_order_between_ranks(digits):
    task = task_registry.get_task("image")({}, {"dataset": "digits"}, digits, "cpu", 8, 100, 0)
    one = [y for _, y in task.batches("train", 0)]
    two = [[y for _, y in task.batches("train", 0, rank, 2)] for rank in (0, 1)]
    assert len(two[0]) == len(two[1]) == task.steps_per_epoch(2) == len(one) // 2
    # global step s of two ranks covers the same samples as steps 2s and 2s+1 of one rank
    for s in range(len(two[0])):
        assert torch.equal(torch.cat([two[0][s], two[1][s]]), torch.cat([one[2 * s], one[2 * s + 1]]))
    assert [y for _, y in task.batches("train", 1)][0].tolist() != one[0].tolist()


# --- determinism and the refactor proof ------------------------------------------------------

def test_same_seed_same_metrics(digits, tmp_path):
    params = {**TINY, "estimator": "upg", "optimizer": "sgd", "lr": 0.1}
    a = run_train("a", params, digits, tmp_path / "a", tmp_path / "ck")
    b = run_train("b", params, digits, tmp_path / "b", tmp_path / "ck")
    assert a["status"] == "finished" and a["epochs_completed"] == 2
    assert comparable(a) == comparable(b)
    assert curves(tmp_path / "a") == curves(tmp_path / "b")
    run_train("c", {**params, "seed": 1}, digits, tmp_path / "c", tmp_path / "ck")
    assert curves(tmp_path / "c") != curves(tmp_path / "a")


REFACTOR_BASELINE = Path(__file__).parent / "data" / "refactor_baseline.json"


def baseline_for_this_cpu(base: dict) -> dict:
    """The refactor baseline's values recorded on this CPU (model name, and torch's kernel
    set where the entry notes one); a skip naming the recording script where none was."""
    from pipeline.environment import cpu
    here = cpu()
    for platform in base["platforms"]:
        if platform["cpu"] == here["cpu"] and platform["cpu_capability"] in (
                None, here["cpu_capability"]):
            return platform["runs"]
    pytest.skip(f"no refactor baseline recorded on {here['cpu']} ({here['cpu_capability']}): "
                "float32 rounds differently per CPU; record one with "
                "tests/data/record_refactor_baseline.py")


@pytest.mark.slow
def test_the_shared_loop_reproduces_the_mdeq_tiny_loop(digits_default_split, tmp_path):
    """The per-step losses and accuracies of the MDEQ-Tiny loop before the shared loop
    (commit 4ac527b, diagnostics off), for three ablations of params.yaml (epochs 2, 6 steps
    an epoch, 3 pretraining steps), recorded on this CPU: the shared loop gives the same
    values to float tolerance. They were bit-identical when the loop was rewritten (AMD
    EPYC) and when the Intel Xeon values were recorded (2026-12-06, on commit 4718430)."""
    base = json.loads(REFACTOR_BASELINE.read_text())
    assert base["commit"].startswith("4ac527b")
    recorded = baseline_for_this_cpu(base)
    for name, run in base["runs"].items():
        ref = recorded[name]
        m = run_train(name, run["params"], digits_default_split, tmp_path / name,
                      tmp_path / "ck")
        frame = pd.read_csv(tmp_path / name / "curves.csv")
        torch.testing.assert_close(frame[M.TRAIN_LOSS].tolist(), ref["loss"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(frame[M.train_metric("acc")].tolist(), ref["train_acc"])
        assert [h["acc"] for h in m["history"]] == ref["test_acc"]


# --- diagnostics -----------------------------------------------------------------------------

def test_diagnostics_leave_training_unchanged(digits, tmp_path):
    """Diagnostics fork the RNG and restore BatchNorm buffers: with or without them, and
    at any frequency, the same losses, accuracies and evaluations (dropout is on)."""
    params = {**TINY, "epochs": 1, "max_steps_per_epoch": 4, "estimator": "npg",
              "optimizer": "sgd", "lr": 0.1, "reference_max_iter": 60}
    keep = (M.TRAIN_LOSS, M.train_metric("acc"), M.SOLVER_REL_RESIDUAL, M.TRAIN_LR)
    off = run_train("off", params, digits, tmp_path / "off", tmp_path / "ck")
    on = run_train("on", {**params, "diagnostics_every": 1}, digits, tmp_path / "on", tmp_path / "ck")
    other = run_train("other", {**params, "diagnostics_every": 3}, digits, tmp_path / "o",
                      tmp_path / "ck")
    assert curves(tmp_path / "off", keep) == curves(tmp_path / "on", keep) == \
        curves(tmp_path / "o", keep)
    assert off["history"][-1]["acc"] == on["history"][-1]["acc"] == other["history"][-1]["acc"]
    assert on["diagnostics"]["count"] == 3 and other["diagnostics"]["count"] == 1  # not pretraining


def test_the_reported_gradient_is_the_applied_gradient(digits, tmp_path, monkeypatch):
    """What diagnostics read is what plain SGD (lr 1, no momentum) then subtracts from the
    parameters: the checkpoint after the step holds the initial parameters minus it."""
    from pipeline.experiments import step as step_module
    from pipeline.experiments import train as train_module
    from pipeline.tracking import NullRun
    seen = {}
    real = step_module.diagnose

    def spy(model, *args, **kwargs):
        seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        seen["out"] = real(model, *args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(step_module, "diagnose", spy)
    params = {**TINY, "epochs": 1, "max_steps_per_epoch": 1, "pretrain_steps": 0,
              "estimator": "npg", "optimizer": "sgd", "lr": 1.0, "momentum": 0.0,
              "weight_decay": 0.0, "schedule": "constant", "diagnostics_every": 1,
              "reference_max_iter": 60}
    task = task_registry.get_task("image")(params["model"], {}, digits, "cpu", 16, 400, 0)
    ck = tmp_path / "last.pt"
    results = train_module.train(TrainConfig.from_params(params), task, NullRun(), ck,
                                 log=lambda _: None)
    torch.manual_seed(0)
    model = task.build_model()
    after = load_checkpoint(ck)["model"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - after[name], seen["grads"][name],
                                   rtol=1e-5, atol=1e-7, msg=name)
    applied_l1 = sum(g.abs().sum().item() for g in seen["grads"].values())
    assert results["curves"][0][M.GRAD_NORM_L1] == pytest.approx(applied_l1, rel=1e-6)


def test_diagnostics_report_a_converged_reference_by_part(digits_default_split, tmp_path):
    """An implicit run whose own backward is tight agrees with the GMRES reference: the
    reference is right, and the cosine is reported whole and per part. (b_tol 1e-4: the
    float32 Broyden backward stalls near 6e-5 here, so a tighter b_tol is never met; it
    meets 1e-4 within 200 steps on the AMD EPYC, after 201 on an Intel Xeon: 400 at most.)"""
    params = {**TINY, "epochs": 1, "max_steps_per_epoch": 1, "pretrain_steps": 0,
              "estimator": "implicit", "b_max_iter": 400, "b_tol": 1e-4, "f_max_iter": 30,
              "diagnostics_every": 1, "reference_max_iter": 600,
              "timing_repeats": 1}  # timed once: the 3-repeat median is the DAG's path
    m = run_train("tight", params, digits_default_split, tmp_path / "out", tmp_path / "ck")
    row = pd.read_csv(tmp_path / "out" / "curves.csv").iloc[0]
    assert row[M.GRAD_IMPLICIT_CONVERGED] == 1.0 and row[M.GRAD_IMPLICIT_REL_RESIDUAL] <= 1e-4
    assert m["diagnostics"]["implicit_converged_fraction"] == 1.0
    assert row[M.GRAD_REF_CONVERGED] == 1.0
    assert row[M.GRAD_REF_REL_RESIDUAL] <= 1e-8
    assert row[M.GRAD_REF_REPLAY_MISMATCH] < 1e-5  # the float64 replay drew the same masks
    for part in ("F", "injection", "head"):
        assert row[M.GRAD_COS_PART.format(part=part)] > 0.999, part
    assert row[M.GRAD_COS] > 0.999
    assert row[M.TIME_GRAD] == row[M.TIME_GRAD_IMPLICIT] and row[M.GRAD_SPEEDUP] == 1.0
    assert row[M.RHO] > 0 and row[M.RHO_ITERS] >= 1


def test_a_reference_that_misses_its_tolerance_is_flagged(digits, tmp_path):
    """Both references: the GMRES one of the cosine (5 steps) and the implicit one of the
    speedup (one Broyden step towards 1e-9); UPG itself solves no backward system."""
    params = {**TINY, "epochs": 1, "max_steps_per_epoch": 1, "pretrain_steps": 0,
              "estimator": "upg", "diagnostics_every": 1, "reference_max_iter": 5,
              "b_max_iter": 1, "b_tol": 1e-9}
    m = run_train("loose", params, digits, tmp_path / "out", tmp_path / "ck")
    row = pd.read_csv(tmp_path / "out" / "curves.csv").iloc[0]
    assert row[M.GRAD_REF_CONVERGED] == 0.0 and row[M.GRAD_REF_REL_RESIDUAL] > 1e-8
    assert m["diagnostics"]["ref_converged_fraction"] == 0.0
    assert m["diagnostics"]["median_cos_sim"] is None  # no converged point, no cosine
    assert row[M.TIME_GRAD_IMPLICIT] > 0 and row[M.GRAD_SPEEDUP] > 0
    assert row[M.GRAD_IMPLICIT_CONVERGED] == 0.0 and row[M.GRAD_IMPLICIT_REL_RESIDUAL] > 1e-9
    assert m["diagnostics"]["implicit_converged_fraction"] == 0.0
    assert "b_max_iter 1, tol 1e-09" in m["diagnostics"]["speedup_reference"]


# --- resume ----------------------------------------------------------------------------------

def test_resume_mid_epoch_after_kill_equals_an_uninterrupted_run(digits, tmp_path, venv_bin,
                                                                 store_uri):
    """SIGKILL after a mid-epoch checkpoint; the rerun resumes in the same MLflow run and
    gives the same curves, evaluations and parameters as a run that was never stopped."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import init_store
    params = {**TINY, "epochs": 2, "max_steps_per_epoch": 6, "checkpoint_every": 2,
              "estimator": "npg", "optimizer": "sgd", "lr": 0.1}
    uri = store_uri
    init_store(uri, str(tmp_path / "artifacts"), ["ablations"])
    ckpt_root = tmp_path / "ck"
    cmd = [str(venv_bin / "python"), "-m", "pipeline",
           *argv("resume", params, digits, tmp_path / "out", ckpt_root, uri)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(ckpt_root.glob("ablations/resume/*/last.pt")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before a checkpoint: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "metrics.json").exists()
    saved = load_checkpoint(next(ckpt_root.glob("ablations/resume/*/last.pt")))
    assert saved["state"]["step_in_epoch"] in (2, 4), "the kill must land mid-epoch"
    assert isinstance(saved["rng"], list) and saved["rng"][0]["cpu"].dtype == torch.uint8

    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and metrics["steps"] == 12
    assert not list(ckpt_root.glob("ablations/resume/*")), "a concluded run keeps no checkpoint"

    client = MlflowClient(uri)
    runs = job_runs(client, client.get_experiment_by_name("ablations").experiment_id)
    assert len(runs) == 1, "the resumed job must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == metrics["mlflow_run_id"]
    assert len(client.get_metric_history(runs[0].info.run_id, M.eval_metric("acc"))) == 2
    losses = client.get_metric_history(runs[0].info.run_id, M.TRAIN_LOSS)
    assert sorted(m.step for m in losses) == list(range(12)), "no step lost or logged twice"

    straight = run_train("straight", params, digits, tmp_path / "straight", tmp_path / "ck2")
    assert {**comparable(straight), "params_hash": None} == {**comparable(metrics), "params_hash": None}
    assert comparable(straight)["eval_by_epoch"] == comparable(metrics)["eval_by_epoch"]
    assert curves(tmp_path / "straight") == curves(tmp_path / "out")


def test_the_final_weights_are_kept_and_reproduce_the_final_evaluation(digits, tmp_path):
    """The checkpoint goes when a run concludes; model.pt stays, for inspection."""
    metrics = run_train("kept", TINY, digits, tmp_path / "out", tmp_path / "ck")
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    cfg = TrainConfig.from_params(TINY)
    task = task_registry.get_task("image")(cfg.model, cfg.data, digits, "cpu", cfg.batch_size,
                                           cfg.eval_batch_size, cfg.seed)
    model = task.build_model()
    model.load_state_dict(state)
    values = task.evaluate(model, cfg.forward_solver, cfg.estimator_config)
    assert values["acc"] == metrics["final"]


# --- divergence ------------------------------------------------------------------------------

def _failed_run(tmp_path, name, params, data, uri):
    from mlflow.tracking import MlflowClient
    metrics = run_train(name, params, data, tmp_path / name, tmp_path / "ck", uri)
    run = MlflowClient(uri).get_run(metrics["mlflow_run_id"])
    assert metrics["status"] == "failed"
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == metrics["reason"]
    return metrics


def test_forward_residual_divergence_is_recorded_as_failed(digits, tmp_path, store_uri):
    uri = store_uri
    params = {**TINY, "estimator": "implicit", "pretrain_steps": 0, "diverge_residual": 1e-12}
    m = _failed_run(tmp_path, "residual", params, digits, uri)
    assert "forward residual" in m["reason"] and "> 1e-12" in m["reason"]


def test_a_diverged_backward_solve_is_a_failed_run_and_each_solve_is_logged(digits, tmp_path,
                                                                            monkeypatch, store_uri):
    """Implicit training logs its backward solve's residual every step; a backward solve
    that meets a non-finite residual (injected at the third) fails the run, naming it."""
    from pipeline.deq import grad
    real, calls = grad.implicit_backward, []

    def injected(backward_solver, stats_out=None):
        inner = real(backward_solver, stats_out)

        def backward(y, h, g):
            out = inner(y, h, g)
            calls.append(1)
            if len(calls) == 3 and stats_out:
                stats_out[-1].diverged, stats_out[-1].reason = True, "injected at step 5"
            return out
        return backward

    monkeypatch.setattr(grad, "implicit_backward", injected)
    uri = store_uri
    params = {**TINY, "estimator": "implicit", "pretrain_steps": 0}
    m = _failed_run(tmp_path, "backward", params, digits, uri)
    assert m["reason"] == "backward solver: injected at step 5 (training step 2)"
    assert m["steps"] == 2
    curves = pd.read_csv(tmp_path / "backward" / "curves.csv")
    assert curves[M.SOLVER_BACKWARD_NSTEPS].between(1, TINY["b_max_iter"]).all()
    assert (curves[M.SOLVER_BACKWARD_REL_RESIDUAL] > 0).all() and len(curves) == 2


class _BrokenImage(ImageTask):
    """The image task with a fault injected at step 2: a NaN loss, or an F that overflows."""

    name = "broken_image"
    fault = "nan_loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def loss(self, model, batch, solver, estimator):
        self.calls += 1
        if self.calls == 3 and self.fault == "inf_state":
            x, y = batch
            return super().loss(model, (x * float("inf"), y), solver, estimator)
        loss, metrics = super().loss(model, batch, solver, estimator)
        if self.calls == 3 and self.fault == "nan_loss":
            loss = loss * float("nan")
        if self.calls == 3 and self.fault == "nan_grad":  # a finite loss, a NaN gradient
            loss.register_hook(lambda g: g * float("nan"))
        return loss, metrics

    def evaluate(self, model, solver, estimator):
        values = super().evaluate(model, solver, estimator)
        if self.fault == "nan_eval":
            values[self.primary_metric] = float("nan")
        return values


@pytest.mark.parametrize("fault, fragment", [("nan_loss", "non-finite loss nan at step 2"),
                                             ("inf_state", "forward solver: non-finite residual"),
                                             ("nan_grad", "non-finite gradient norm nan at step 2")])
def test_nan_loss_and_solver_divergence_are_recorded_as_failed(digits, tmp_path, fault, fragment,
                                                             monkeypatch, store_uri):
    monkeypatch.setitem(task_registry.TASKS, "broken_image", _BrokenImage)
    monkeypatch.setattr(_BrokenImage, "fault", fault)
    uri = store_uri
    params = {**TINY, "task": "broken_image", "pretrain_steps": 0}
    if fault == "nan_grad":  # UPG: implicit's backward solve would stop it first
        params["estimator"] = "upg"
    m = _failed_run(tmp_path, fault, params, digits, uri)
    assert fragment in m["reason"], m["reason"]
    assert m["steps"] == 2 and len(pd.read_csv(tmp_path / fault / "curves.csv")) == 2


def test_a_non_finite_evaluation_is_a_failed_run(digits, tmp_path, monkeypatch, store_uri):
    monkeypatch.setitem(task_registry.TASKS, "broken_image", _BrokenImage)
    monkeypatch.setattr(_BrokenImage, "fault", "nan_eval")
    uri = store_uri
    params = {**TINY, "task": "broken_image", "pretrain_steps": 0}
    m = _failed_run(tmp_path, "nan_eval", params, digits, uri)
    assert "non-finite evaluation" in m["reason"] and "nan at step 3" in m["reason"], m


def test_an_exploding_loss_is_a_failed_run_not_a_finished_one(digits, tmp_path, store_uri):
    """Adam at lr 1000 sent the loss from 2.2 to 1.7e8 with no NaN, and the run once ended
    "finished" with chance accuracy."""
    uri = store_uri
    params = {**TINY, "lr": 1000.0, "weight_decay": 0.0}
    m = _failed_run(tmp_path, "exploding", params, digits, uri)
    assert "x the early loss" in m["reason"] and "(step 0) at step 1" in m["reason"]
    losses = pd.read_csv(tmp_path / "exploding" / "curves.csv")[M.TRAIN_LOSS]
    assert len(losses) == m["steps"] >= 1 and losses.map(math.isfinite).all()
    # the same run with the rule off goes on past the step where it was stopped
    off = run_train("off", {**params, "diverge_loss_factor": None}, digits, tmp_path / "off",
                    tmp_path / "ck")
    assert off["steps"] > m["steps"], off


def test_sigterm_marks_the_run_failed_keeps_the_checkpoint_and_resumes(digits, tmp_path,
                                                                        venv_bin, store_uri):
    """scancel sends SIGTERM: MLflow says FAILED with the signal, the last checkpoint stays,
    and the rerun resumes it; a job stopped before its first checkpoint leaves no empty
    checkpoints/ folder."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import init_store
    params = {**TINY, "epochs": 2, "max_steps_per_epoch": 6, "checkpoint_every": 2}
    uri = store_uri
    init_store(uri, str(tmp_path / "artifacts"), ["ablations"])
    ckpt_root = tmp_path / "ck"
    cmd = [str(venv_bin / "python"), "-m", "pipeline",
           *argv("term", params, digits, tmp_path / "out", ckpt_root, uri)]

    early = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in early.stdout:  # stopped once training is set up, before any checkpoint
        if "trainable parameters" in line:
            break
    early.send_signal(signal.SIGTERM)
    out, _ = early.communicate(timeout=60)
    assert early.returncode == 128 + signal.SIGTERM, out
    assert not ckpt_root.exists(), sorted(map(str, ckpt_root.rglob("*")))

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(ckpt_root.glob("ablations/term/*/last.pt")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out
    assert list(ckpt_root.glob("ablations/term/*/last.pt")), "the checkpoint must stay"
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("ablations").experiment_id],
                             "attributes.run_name = 'term'", order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "Terminated: stopped by SIGTERM"

    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and "failure_reason" not in after.data.tags
    assert not ckpt_root.exists(), "a concluded run leaves no checkpoints/ folder"


# --- tracking --------------------------------------------------------------------------------

def test_tracked_run_has_curves_tags_and_params(digits, tmp_path, store_uri):
    from mlflow.tracking import MlflowClient
    uri = store_uri
    params = {**TINY, "epochs": 1, "estimator": "upg", "optimizer": "sgd", "lr": 0.1,
              "diagnostics_every": 2, "reference_max_iter": 40}
    metrics = run_train("tracked", params, digits, tmp_path / "out", tmp_path / "ck", uri)
    assert metrics["git_commit"] and metrics["study"] == "ablations"
    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "ablations"  # the study
    for tag in ("git_commit", "params_hash", "dataset", "scale", "study", "run", "task"):
        assert tag in run.data.tags
    assert run.data.tags["dataset"] == "digits"
    assert run.data.params["run.k"] == "5"            # the resolved config, defaults included
    assert run.data.params["run.estimator"] == "upg"
    assert run.data.params["run.model.num_layers"] == "2"
    steps = TINY["max_steps_per_epoch"]
    rid = run.info.run_id
    for key in (M.TRAIN_LOSS, M.train_metric("acc"), M.TRAIN_LR):
        assert len(client.get_metric_history(rid, key)) == steps, key
    # pretraining steps run no solver; the first estimator step is measured for memory
    for key in (M.SOLVER_REL_RESIDUAL, M.SOLVER_NSTEPS):
        logged = client.get_metric_history(rid, key)
        assert sorted(m.step for m in logged) == list(range(TINY["pretrain_steps"], steps)), key
    assert [m.step for m in client.get_metric_history(rid, M.MEMORY_STEP_PEAK)] == [1]
    assert sorted(m.step for m in client.get_metric_history(rid, M.TIME_STEP)) == [0, 2]
    cos = client.get_metric_history(rid, M.GRAD_COS)
    assert [m.step for m in cos] == [1]                # after every 2 steps: step 1
    for key in (M.GRAD_COS_PART.format(part="F"), M.GRAD_REF_REL_RESIDUAL, M.GRAD_REF_CONVERGED,
                M.RHO, M.RHO_LAMBDA, M.RHO_ITERS, M.RHO_SETTLED, M.GRAD_NORM_L1,
                M.GRAD_REF_NORM_L1, M.TIME_GRAD, M.TIME_GRAD_IMPLICIT, M.GRAD_SPEEDUP,
                M.TIME_DIAGNOSTICS, M.eval_metric("acc"), M.best_eval_metric("acc")):
        assert client.get_metric_history(rid, key), key


def test_one_epoch_on_cifar_format_data(tmp_path):
    """The CIFAR code path: the test archive in the true format, exported by the real rule's
    code, then one (short) epoch of training at 32x32x3."""
    from conftest import make_cifar_archive, md5

    from pipeline.data.cifar10 import prepare_cifar10
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(archive)
    data = tmp_path / "cifar10"
    prepare_cifar10(data, url="http://127.0.0.1:9/unused", md5=md5(archive), archive=archive)
    params = {**TINY, "epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2,
              "data": {"dataset": "cifar10"}, "estimator": "upg", "optimizer": "sgd", "lr": 0.1}
    metrics = run_train("cifar", params, data, tmp_path / "out", tmp_path / "ck")
    assert metrics["status"] == "finished" and metrics["dataset"] == "cifar10"
    assert metrics["trainable_params"] == 158_986  # MDEQ-Tiny at 32x32x3, 10 classes
    assert metrics["steps"] == 2 and metrics["final"] is not None
    with pytest.raises(ValueError, match="holds 'cifar10', but the run's dataset is 'digits'"):
        run_train("wrong", {**params, "data": {"dataset": "digits"}}, data, tmp_path / "w",
                  tmp_path / "ck")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_fails_clearly(digits, tmp_path, venv_bin):
    cmd = [str(venv_bin / "python"), "-m", "pipeline",
           *argv("gpu", {**TINY, "device": "cuda"}, digits, tmp_path / "out", tmp_path / "ck")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "device='cuda' but no CUDA device is visible" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_test_time_evaluation_records_every_setting(digits, tmp_path):
    """Appendix §2's test-time settings after training: 0, k, 2k unrolled steps and half /
    twice the forward budget, each with its accuracy and time; the verdict's quantities
    follow from them, with two binomial standard errors at k steps."""
    params = {**TINY, "epochs": 1, "estimator": "upg", "k": 3, "lam": 0.5, "optimizer": "sgd",
              "lr": 0.1, "pretrain_steps": 0, "test_time_eval": True}
    m = run_train("tt", params, digits, tmp_path / "tt", tmp_path / "ck")
    tt = m["test_time"]
    at = {s["setting"]: s for s in tt["settings"]}
    assert list(at) == ["unroll 0", "unroll k=3", "unroll 2k=6", "f_max_iter x0.5",
                        "f_max_iter x2"]
    assert [at[s]["unroll"] for s in at] == [0, 3, 6, 0, 0]
    assert [at[s]["f_max_iter"] for s in at] == [8, 8, 8, 4, 16]
    assert all(s["eval_s"] > 0 for s in tt["settings"])
    assert at["unroll 0"]["acc"] == m["history"][-1]["acc"]  # the loop's own evaluation
    assert tt["count"] == 90
    p = at["unroll k=3"]["acc"]
    assert tt["two_se"] == pytest.approx(2 * math.sqrt(p * (1 - p) / 90))
    assert tt["decay_without_unrolling"] == pytest.approx(p - at["unroll 0"]["acc"])
    assert tt["gain_from_2k"] == pytest.approx(at["unroll 2k=6"]["acc"] - p)


def test_test_time_eval_needs_a_fixed_point():
    with pytest.raises(ValueError, match="test_time_eval"):
        TrainConfig.from_params({"estimator": "bptt", "diagnostics_every": 0,
                                 "test_time_eval": True})


def test_on_a_jr_step_the_reference_includes_the_penalty(digits_default_split, monkeypatch):
    """The applied gradient of a JR step holds the penalty's gradient; the reference adds
    the same term (weight, probe vectors): with implicit differentiation and a converged
    backward the cosine is that of two equal gradients, and it drops where the reference
    leaves the penalty out (both references of the same step, diagnosed twice)."""
    from pipeline.experiments import step as step_module
    from pipeline.experiments.train import train
    from pipeline.tracking import NullRun
    real, seen = step_module.diagnose, {}

    def twice(*args, **kwargs):
        seen["without"] = real(*args[:7])  # the task's loss alone, as before
        seen["with"] = real(*args, **kwargs)
        return seen["with"]

    monkeypatch.setattr(step_module, "diagnose", twice)
    params = {**TINY, "epochs": 1, "max_steps_per_epoch": 1, "pretrain_steps": 0,
              "estimator": "implicit", "b_max_iter": 400, "b_tol": 1e-4, "f_max_iter": 30,
              "diagnostics_every": 1, "reference_max_iter": 600, "timing_repeats": 1,
              "memory_every": 0, "jacobian_reg": {"weight": 20.0, "freq": 1.0}}
    cfg = TrainConfig.from_params(params)
    task = task_registry.get_task("image")(cfg.model, cfg.data, digits_default_split, "cpu", 16,
                                           400, 0)
    row = train(cfg, task, NullRun(), None, log=lambda _: None)["curves"][0]
    assert row[M.JR_WEIGHT] == 20.0 and row[M.GRAD_IMPLICIT_CONVERGED] == 1.0, row
    assert seen["with"][M.GRAD_REF_CONVERGED] == seen["without"][M.GRAD_REF_CONVERGED] == 1.0
    assert row[M.GRAD_COS] == seen["with"][M.GRAD_COS] >= 0.999
    assert seen["without"][M.GRAD_COS] < 0.99
