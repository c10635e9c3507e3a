"""The ``train`` job: one run of a training study, from the command line to its results.

    python -m pipeline train --study ablations --name upg_sgd --params '<merged run, JSON>' \
        --data data/digits --out results/ablations/upg_sgd --checkpoints checkpoints

The MLflow experiment is the study, the run is named by ``--name``. The job builds the
task, starts (or, after a kill, resumes) the MLflow run with the environment's tags
(:mod:`pipeline.environment`) and the dataset as an input (name, sha256 of its files), calls
:func:`.train.train`, and writes ``metrics.json`` (with ``environment``) and ``curves.csv``
to ``--out``; a concluded run removes its
checkpoint. Under ``torchrun`` rank 0 alone talks to MLflow and writes results.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline import environment, tracking
from pipeline.data import dataset_digest
from pipeline.experiments import determinism, distributed
from pipeline.experiments.checkpoint import load_checkpoint
from pipeline.experiments.tasks import get_task
from pipeline.experiments.train import train
from pipeline.experiments.train_config import TrainConfig
from pipeline.io import params_hash, prune_empty_dirs, write_csv, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--study", required=True, help="the study: the MLflow experiment")
    parser.add_argument("--name", required=True, help="the run, an entry of <study>.runs")
    parser.add_argument("--params", required=True, help="the merged run params, JSON")
    parser.add_argument("--data", required=True, help="the task's data directory")
    parser.add_argument("--out", required=True, help="results/<study>/<name>")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--scale", default="default")
    tracking.add_run_arguments(parser)
    parser.add_argument("--threads", type=int, default=0,
                        help="the job's threads; under torchrun each rank takes "
                             "max(1, threads // ranks)")


def config_from_args(args) -> tuple[dict, TrainConfig]:
    """(the run's params, its TrainConfig) from the CLI arguments; sets the thread count and
    refuses a CUDA device where none is visible. Shared by ``train`` and ``train-repeats``."""
    if args.threads:
        torch.set_num_threads(max(1, args.threads // distributed.from_env().world_size))
    params = json.loads(args.params)
    cfg = TrainConfig.from_params(params)
    determinism.configure(cfg.deterministic)  # before CUDA starts: CUBLAS_WORKSPACE_CONFIG
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"{args.study} run {args.name}: device={cfg.device!r} but no CUDA "
                         "device is visible; run the paper scale on a GPU node (profiles/slurm) "
                         f"or set {args.study}.defaults.device: cpu")
    return params, cfg


def main(args) -> int:
    import pandas as pd

    params, cfg = config_from_args(args)
    d = distributed.from_env()  # torchrun's ranks, or one process
    if d.world_size != cfg.nproc_per_node:  # its batch order and global batch depend on it
        raise SystemExit(f"{args.study} run {args.name}: nproc_per_node={cfg.nproc_per_node} "
                         f"but {d.world_size} rank(s) started; launch it with torchrun "
                         f"--standalone --nproc_per_node={cfg.nproc_per_node} (its rule does)")
    cfg = dataclasses.replace(cfg, device=distributed.init(d, cfg.device))
    phash = params_hash(params)
    checkpoint = Path(args.checkpoints) / args.study / args.name / phash / "last.pt"
    resume = load_checkpoint(checkpoint) if checkpoint.exists() else None
    run_id = resume.get("run_id") if resume else None
    task = get_task(cfg.task)(cfg.model, cfg.data, args.data, cfg.device, cfg.batch_size,
                              cfg.eval_batch_size, cfg.seed)
    env = environment.record(cfg.device)
    tags = {"study": args.study, "run": args.name, "task": cfg.task, "scale": args.scale,
            "dataset": task.dataset, "params_hash": phash, "world_size": d.world_size,
            **environment.tags(env), **json.loads(args.tags)}
    # Rank 0 alone talks to MLflow and writes results; the others train beside it.
    run = (tracking.start_run(args.tracking_uri, args.study, args.name, tags,
                              {"run": dataclasses.asdict(cfg), "study": args.study,
                               "name": args.name, "scale": args.scale,
                               "world_size": d.world_size},
                              args.artifacts, run_id=run_id,
                              batch_size=args.tracking_batch_size,
                              system_metrics_s=args.system_metrics)
           if d.is_main else nullcontext(tracking.NullRun()))
    try:
        with run as tracker:
            out = Path(args.out)
            tracker.log_dataset(task.dataset, dataset_digest(args.data), str(args.data),
                                ["train", task.eval_split])
            results = train(cfg, task, tracker, checkpoint,
                            log=(lambda msg: print(msg, flush=True)) if d.is_main
                            else (lambda msg: None), resume=resume,
                            weights=out / "model.pt", rank=d.rank, world_size=d.world_size)
            results.update(study=args.study, name=args.name, scale=args.scale,
                           params_hash=phash, mlflow_run_id=tracker.run_id,
                           world_size=d.world_size, tracking_s=tracking.store_seconds(),
                           environment={**env, **results["numerics"]})
            if d.is_main:
                write_csv(pd.DataFrame(results.pop("curves")), out / "curves.csv")
                write_json(results, out / "metrics.json")
                tracker.log_artifact(out / "metrics.json")
                tracker.log_artifact(out / "curves.csv")
        distributed.barrier(d)  # every rank has finished with the checkpoint
        # The run has concluded: its checkpoint only served an interrupted job, and must not
        # turn a later forced rerun (say, after a code change) into a no-op resume.
        if d.is_main:
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
    finally:  # <checkpoints>/<study>/<name>/<hash>/ and above, where nothing was saved
        if d.is_main:
            prune_empty_dirs(checkpoint.parent, levels=4)
        distributed.shutdown(d)
    if not d.is_main:
        return 0
    print(f"{args.study}/{args.name}: {results['status']} {results['reason']} best "
          f"{results['primary_metric']} {results['best']}")
    return 0
