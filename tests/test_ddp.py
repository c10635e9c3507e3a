"""Data-parallel training (pipeline.experiments.distributed) in the shared loop, on 2 gloo
CPU processes: one DDP step equals one single-process step on the same global batch, and
a 2-rank run resumes from its checkpoint equal to an uninterrupted one.

Run: ``.venv/bin/python -m pytest tests/test_ddp.py -q`` (CPU, about a minute on 2 cores).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline import tracking as M
from pipeline.data.digits import export_digits
from pipeline.experiments import distributed
from pipeline.experiments.tasks import get_task
from pipeline.experiments.checkpoint import load_checkpoint
from pipeline.experiments.optim import make_optimizer, make_scheduler
from pipeline.experiments.step import train_step
from pipeline.experiments.train import train
from pipeline.experiments.train_config import TrainConfig
from pipeline.tracking import NullRun

B = 8  # samples per rank
# Dropout 0 and BatchNorm in eval mode (below): per-rank dropout masks and per-rank batch
# statistics differ from the single process by design. So does a solve's stopping: the
# solvers stop on, and return the iterate of, the lowest batch-wide residual (MDEQ's
# Broyden), and a rank's half batch has its own. Here the solves run a fixed budget (tol 0)
# of fixed-point steps, whose residual falls at every step, so every solve returns its last
# iterate, which is per sample. (With Broyden the step-1 gradients differed by ~1e-5 here.)
STEP = {"model": {"preset": "tiny", "dropout": 0.0, "num_layers": 2}, "pretrain_steps": 0,
        "f_solver": "fixed_point", "b_solver": "fixed_point",
        "f_max_iter": 6, "f_tol": 0.0, "b_max_iter": 6, "b_tol": 0.0, "optimizer": "sgd",
        "lr": 0.1, "weight_decay": 1e-4, "diagnostics_every": 2, "reference_max_iter": 30,
        "reference_restart": 30, "timing_repeats": 1, "power_iters": 3, "memory_every": 0,
        "diverge_loss_factor": None}
RUN = {"epochs": 2, "max_steps_per_epoch": 3, "batch_size": B, "eval_batch_size": 100,
       "f_max_iter": 6, "b_max_iter": 6, "pretrain_steps": 1, "model": {"num_layers": 2},
       "checkpoint_every": 2, "diagnostics_every": 0, "optimizer": "sgd", "lr": 0.05}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    export_digits(out, 0.2, 0)
    return out


def _two_ranks(fn, args: tuple) -> None:
    """``fn(rank, *args)`` on ranks 0 and 1, each a process of its own, forked from a
    fork server that imported torch, TorchDynamo (the optimizer's constructor imports it)
    and the loop once: a spawned rank starts a new interpreter and spends ~3 s of CPU
    importing them again (5 launches, 10 ranks). The server starts with the first launch
    and keeps that test's environment and output streams: a rank's Python traceback still
    reaches the test, its C-level output (a gloo error) goes to the first test's capture."""
    mp.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "pipeline.experiments.train"])
    mp.start_processes(fn, args=args, nprocs=2, join=True, start_method="forkserver")


def _task(cfg: TrainConfig, data: Path, batch_size: int):
    return get_task(cfg.task)(cfg.model, cfg.data, data, "cpu", batch_size,
                              cfg.eval_batch_size, cfg.seed)


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def two_steps(cfg: TrainConfig, data: Path, batch_size: int, d: distributed.Dist) -> dict:
    """Two steps of the loop's own ``train_step`` (the second with diagnostics, the no_sync
    path): each step's row, the gradient it applied, and the parameters after both."""
    torch.manual_seed(cfg.seed)
    task = _task(cfg, data, batch_size)
    model = task.build_model()
    model.train()
    _freeze_batchnorm(model)
    net = distributed.wrap(model, d, "cpu")
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, 10)
    state = {"epoch": 0, "step": 0, "memory_epoch": -1, "curves": []}
    out = {"rows": [], "grads": []}
    for batch in list(task.batches("train", 0, d.rank, d.world_size))[:2]:
        row = train_step(cfg, task, model, opt, sched, batch, state, cfg.diagnostics_config, net, d)
        out["rows"].append(row)
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        state["step"] += 1
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _init(rank: int, world: int, folder: Path) -> distributed.Dist:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    return distributed.Dist(rank, world)


def _step_worker(rank: int, world: int, folder: Path, data: Path, params: dict) -> None:
    d = _init(rank, world, folder)
    try:
        torch.save(two_steps(TrainConfig.from_params(params), data, B, d), folder / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("estimator", ["upg", "implicit"])
def test_ddp_step_equals_single_process_step(digits, tmp_path, estimator):
    """The mean of the ranks' losses and DDP's averaged gradient on 2 x B samples equal the
    loss and gradient of one process on those 2B samples, on a plain step and on a
    diagnostics step (backward under no_sync, then averaged by hand)."""
    params = {**STEP, "estimator": estimator}
    _two_ranks(_step_worker, (2, tmp_path, digits, params))
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    single = two_steps(TrainConfig.from_params(params), digits, 2 * B, distributed.SINGLE)
    for step in range(2):
        loss = single["rows"][step]["train/loss"]
        assert ranks[0]["rows"][step]["train/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert ranks[1]["rows"][step]["train/loss"] == ranks[0]["rows"][step]["train/loss"]
        assert ranks[0]["rows"][step]["train/acc"] == pytest.approx(
            single["rows"][step]["train/acc"], abs=1e-9)
        for name, g in single["grads"][step].items():
            assert torch.allclose(ranks[0]["grads"][step][name], g, rtol=1e-4, atol=1e-6), \
                (step, name, (ranks[0]["grads"][step][name] - g).abs().max().item())
            assert torch.equal(ranks[1]["grads"][step][name], ranks[0]["grads"][step][name])
    assert M.GRAD_COS in ranks[0]["rows"][1], "rank 0 ran the diagnostics on step 1"
    assert M.GRAD_COS not in ranks[1]["rows"][1], "rank 1 did not"
    for name, p in single["params"].items():
        assert torch.allclose(ranks[0]["params"][name], p, rtol=1e-4, atol=1e-6), name
    # The two ranks really saw different samples: each rank's loss differs from the mean.
    assert ranks[0]["rows"][0]["train/loss"] != pytest.approx(
        two_steps(TrainConfig.from_params(params), digits, B, distributed.SINGLE)
        ["rows"][0]["train/loss"], rel=1e-3)


class Interrupt(Exception):
    pass


def _resume_worker(rank: int, world: int, folder: Path, data: Path, mode: str) -> None:
    d = _init(rank, world, folder)
    cfg = TrainConfig.from_params(RUN)
    task = _task(cfg, data, cfg.batch_size)
    ckpt = folder / "last.pt"
    try:
        if mode == "whole":
            result = train(cfg, task, NullRun(), None, log=lambda m: None, rank=rank,
                           world_size=world)
        elif mode == "interrupted":
            def log(msg):  # the end of epoch 1: its checkpoint (step 2) is the last one
                if msg.startswith("epoch 1/"):
                    raise Interrupt(msg)
            try:
                train(cfg, task, NullRun(), ckpt, log=log, rank=rank, world_size=world)
            except Interrupt:
                pass
            return
        else:
            result = train(cfg, task, NullRun(), ckpt, log=lambda m: None, rank=rank,
                           world_size=world, resume=load_checkpoint(ckpt))
        result.pop("git_commit")
        for key in ("time_per_epoch_s", "mean_forward_s", "mean_backward_s", "mean_step_s",
                    "peak_memory_mb", "diagnostics"):
            result.pop(key)
        result["history"] = [{k: v for k, v in h.items() if k != "epoch_s"}
                             for h in result["history"]]
        result["curves"] = [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))}
                            for r in result["curves"]]
        (folder / f"{mode}_{rank}.json").write_text(json.dumps(result, sort_keys=True))
    finally:
        dist.destroy_process_group()


def test_ddp_resume_equals_uninterrupted_run(digits, tmp_path):
    """Dropout on and BatchNorm in training mode: the ranks draw their own masks, and the
    resumed run matches only because every rank's RNG state came back from the checkpoint."""
    for mode in ("whole", "interrupted", "resumed"):
        folder = tmp_path / mode if mode == "whole" else tmp_path / "run"
        folder.mkdir(exist_ok=True)
        (folder / "rendezvous").unlink(missing_ok=True)
        _two_ranks(_resume_worker, (2, folder, digits, mode))
        if mode == "interrupted":
            ck = load_checkpoint(folder / "last.pt")
            assert ck["state"]["step"] == 2 and len(ck["rng"]) == 2
            assert not torch.equal(ck["rng"][0]["cpu"], ck["rng"][1]["cpu"])
            cfg = TrainConfig.from_params(RUN)
            with pytest.raises(ValueError, match=r"written by 2 rank\(s\); resume it with as "
                                                 r"many, not 1"):
                train(cfg, _task(cfg, digits, cfg.batch_size), NullRun(), folder / "last.pt",
                      log=lambda m: None, resume=ck)
    whole = [json.loads((tmp_path / "whole" / f"whole_{r}.json").read_text()) for r in range(2)]
    resumed = [json.loads((tmp_path / "run" / f"resumed_{r}.json").read_text()) for r in range(2)]
    assert whole[0]["steps"] == 6 and whole[0]["history"]
    assert resumed[0] == whole[0]
    assert resumed[1] == whole[1] == whole[0], "every rank returns the same results"


# --- the entry point under torchrun ------------------------------------------------------------

def _torchrun(venv_bin: Path, name: str, params: dict, data: Path, out: Path, ckpt: Path,
              uri: str) -> list[str]:
    return [str(venv_bin / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "pipeline",
            "train", "--study", "vision", "--name", name, "--params", json.dumps(params),
            "--data", str(data), "--out", str(out), "--checkpoints", str(ckpt),
            "--tracking-uri", uri, "--artifacts", str(out.parent / "artifacts"),
            "--threads", "2"]


def test_torchrun_job_killed_and_rerun_resumes_the_same_mlflow_run(digits, tmp_path, venv_bin,
                                                                   store_uri):
    """`torchrun --nproc_per_node=2 -m pipeline train`: SIGKILL of the whole job after a
    mid-epoch checkpoint; the rerun resumes in rank 0's MLflow run and ends as a 2-rank run
    that was never stopped; one metrics.json, one MLflow run, no checkpoint left. Without
    torchrun, a run asking for 2 ranks is refused, naming the launch it needs."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import init_store, job_runs
    params = {**RUN, "max_steps_per_epoch": 6, "nproc_per_node": 2}
    uri = store_uri
    init_store(uri, str(tmp_path / "artifacts"), ["vision"])
    ckpt = tmp_path / "ck"
    cmd = _torchrun(venv_bin, "resume", params, digits, tmp_path / "out", ckpt, uri)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 180
    while not list(ckpt.glob("vision/resume/*/last.pt")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ended before a checkpoint: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.01)
    # torchrun starts each rank in a session of its own: killing torchrun's process group
    # alone orphans the ranks, which then finish the run. Kill the whole tree, as a job
    # scheduler ending the job's cgroup does.
    import psutil
    ranks = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in ranks:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    assert not (tmp_path / "out" / "metrics.json").exists(), "the job was stopped"
    saved = load_checkpoint(next(ckpt.glob("vision/resume/*/last.pt")))
    assert saved["state"]["step_in_epoch"] in (2, 4) and len(saved["rng"]) == 2
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert resumed.stdout.count("resumed from") == 1, "rank 0 alone logs"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 12
    assert not list(ckpt.glob("vision/resume/*")), "a concluded run keeps no checkpoint"
    client = MlflowClient(uri)
    runs = job_runs(client, client.get_experiment_by_name("vision").experiment_id)
    assert [r.info.run_id for r in runs] == [metrics["mlflow_run_id"]]
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(12)), "no step lost or logged twice"

    straight = subprocess.run(_torchrun(venv_bin, "straight", params, digits,
                                        tmp_path / "straight", tmp_path / "ck2", "none"),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    other = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert other["history"] and [h["acc"] for h in other["history"]] == \
        [h["acc"] for h in metrics["history"]]
    import pandas as pd
    keep = ["step", "train/loss", "train/acc", "solver/rel_residual"]
    assert pd.read_csv(tmp_path / "straight" / "curves.csv")[keep].equals(
        pd.read_csv(tmp_path / "out" / "curves.csv")[keep])

    alone = subprocess.run([str(venv_bin / "python"), *cmd[3:]], capture_output=True, text=True,
                           timeout=120)
    assert alone.returncode != 0
    assert "nproc_per_node=2 but 1 rank(s) started; launch it with torchrun" in alone.stderr
