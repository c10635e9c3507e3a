"""Train one MDEQ-Tiny ablation (appendix §4.2), driven entirely by its params.

    python -m pipeline train --name upg_sgd --params '<merged ablation params, JSON>' \
        --data data/digits --out results/ablations/upg_sgd --checkpoints checkpoints/ablations

What a step logs (MLflow, in batches): loss, train accuracy, learning rate, forward
solver steps and final relative residual, step / forward / backward time. Every
``diagnostics_every`` steps, on the same batch and the same dropout masks: the
cosine similarity between the gradient the estimator gives and the exact implicit
gradient (tight backward solve), both norms, and rho(dF/dh), rho(dF_lam/dh) by
power method. Every epoch: test accuracy (best and final kept), peak memory.

Checkpoints (model, optimizer, scheduler, RNG, MLflow run id) live outside the
declared outputs, under ``<checkpoints>/<name>/<params hash>/``: a killed job resumes
from its last epoch in the same MLflow run. A concluded run removes its checkpoint. A divergent run (NaN/Inf loss, a
forward residual past ``diverge_residual``) stops; MLflow marks it FAILED with the
reason and ``metrics.json`` says ``"status": "failed"``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as Fn

from pipeline.deq import (EstimatorConfig, SolverConfig, attach_estimator, implicit_layer,
                          jacobian_spectral_radius, solve)
from pipeline.models.mdeq import MDEQ, MDEQConfig, unpack
from pipeline.progress import progress

Tensor = torch.Tensor


@dataclass(frozen=True)
class TrainConfig:
    """One ablation: ``ablations.defaults`` merged with ``ablations.runs.<name>``."""

    dataset: str = "digits"
    epochs: int = 4
    batch_size: int = 64
    eval_batch_size: int = 500
    max_steps_per_epoch: int | None = None   # cap for smoke tests; None = the whole epoch
    seed: int = 0
    device: str = "cpu"
    dropout: float = 0.25
    f_solver: str = "broyden"
    f_max_iter: int = 22                     # MDEQ-Tiny F_THRES
    f_tol: float = 1e-3
    b_solver: str = "broyden"
    b_max_iter: int = 24                     # MDEQ-Tiny B_THRES
    b_tol: float = 1e-3
    estimator: str = "implicit"
    k: int = 5
    lam: float = 0.5
    pretrain_steps: int = 0                  # MDEQ's unrolled pretraining, weight-tied
    pretrain_layers: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2.5e-6
    schedule: str = "cosine"
    diagnostics_every: int = 20
    diagnostics_b_max_iter: int = 60
    diagnostics_b_tol: float = 1e-6
    power_iters: int = 20
    diverge_residual: float = 1e3

    @classmethod
    def from_params(cls, params: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown ablation keys {unknown}; valid keys: {sorted(names)}")
        return cls(**params)

    @property
    def forward_solver(self) -> SolverConfig:
        return SolverConfig(self.f_solver, self.f_max_iter, self.f_tol)

    @property
    def estimator_config(self) -> EstimatorConfig:
        return EstimatorConfig(self.estimator, self.k, self.lam, self.b_solver, self.b_max_iter,
                               self.b_tol)

    @property
    def pretrain_config(self) -> EstimatorConfig:
        return EstimatorConfig("unrolled", k=self.pretrain_layers)

    @property
    def implicit_config(self) -> EstimatorConfig:
        """Implicit differentiation with this run's backward budget (MDEQ's b_thres): the
        reference of the same-batch backward speedup."""
        return EstimatorConfig("implicit", b_solver=self.b_solver, b_max_iter=self.b_max_iter,
                               b_tol=self.b_tol)

    @property
    def exact_config(self) -> EstimatorConfig:
        """The reference of every training-time cosine: implicit with a tight backward solve."""
        return EstimatorConfig("implicit", b_solver="broyden", b_max_iter=self.diagnostics_b_max_iter,
                               b_tol=self.diagnostics_b_tol)


class Divergence(RuntimeError):
    """Training diverged; the message is the reason recorded in MLflow and metrics.json."""


# --- data ------------------------------------------------------------------------------------

def load_tensors(data_dir: str | Path, device: str) -> dict:
    """Images as float (N, C, H, W), normalised by the training set's per-channel statistics."""
    from pipeline.data import load_meta, load_split
    meta = load_meta(data_dir)
    out = {"meta": meta}
    for split in ("train", "test"):
        images, labels = load_split(data_dir, split)
        out[split] = (images.permute(0, 3, 1, 2).float().div(255), labels)
    x = out["train"][0]
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    for split in ("train", "test"):
        images, labels = out[split]
        out[split] = (((images - mean) / std).to(device), labels.to(device))
    return out


def batches(n: int, batch_size: int, seed: int, epoch: int):
    """A fixed permutation per (seed, epoch): deterministic, and resumable without saved state."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    for i in range(0, n - batch_size + 1, batch_size):  # drop the last partial batch, as MDEQ
        yield order[i:i + batch_size]


# --- model pieces ----------------------------------------------------------------------------

def build(cfg: TrainConfig, meta: dict):
    torch.manual_seed(cfg.seed)
    H, W, C = meta["image_shape"]
    model = MDEQ(MDEQConfig(in_channels=C, num_classes=meta["num_classes"], image_size=H,
                            dropout=cfg.dropout)).to(cfg.device)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    else:
        raise ValueError(f"optimizer {cfg.optimizer!r}; valid: ['adam', 'sgd']")
    return model, opt


def make_scheduler(cfg: TrainConfig, opt, total_steps: int):
    if cfg.schedule == "cosine":  # MDEQ: cosine annealing over all iterations
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total_steps), eta_min=1e-6)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"schedule {cfg.schedule!r}; valid: ['cosine', 'constant']")


def clock(device: str) -> float:
    """Wall time after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb(device: str) -> float:
    """CUDA: peak allocated since the epoch began. CPU: the process's peak RSS so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, images: Tensor, labels: Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), cfg.eval_batch_size):
        logits, _ = model(images[i:i + cfg.eval_batch_size], cfg.forward_solver, cfg.estimator_config)
        correct += (logits.argmax(1) == labels[i:i + cfg.eval_batch_size]).sum().item()
    model.train()
    return correct / len(labels)


def diagnostics(model, cfg: TrainConfig, estimator: EstimatorConfig, x: Tensor, y: Tensor) -> dict:
    """Gradient fidelity, backward cost and spectral radii on one batch, one set of dropout
    masks, one h*: the estimator used against the exact implicit gradient, and its time
    against implicit differentiation with the run's b_thres (side by side, same state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # BatchNorm stats stay untouched
    func, h0, shapes = model.problem(x)
    h_star, _ = solve(func, h0, cfg.forward_solver)

    def grad_of(est: EstimatorConfig) -> Tensor:
        if est.name in ("unrolled", "bptt"):
            h, _ = implicit_layer(func, h0, cfg.forward_solver, est)
        else:
            h = attach_estimator(func, h_star, est)
        loss = Fn.cross_entropy(model.head(unpack(h, shapes)), y)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(grads, params)])

    def timed(est: EstimatorConfig) -> tuple[Tensor, float]:
        t0 = clock(cfg.device)
        g = grad_of(est)
        return g, clock(cfg.device) - t0

    used, used_s = timed(estimator)
    # An implicit run's gradient is the reference itself: no second identical backward.
    same = (estimator.name == "implicit"
            and estimator.backward_solver == cfg.implicit_config.backward_solver)
    implicit_s = used_s if same else timed(cfg.implicit_config)[1]
    exact = grad_of(cfg.exact_config)
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
    rho = jacobian_spectral_radius(func, h_star, 1.0, cfg.power_iters, gen).mean().item()
    rho_lam = jacobian_spectral_radius(func, h_star, cfg.lam, cfg.power_iters, gen).mean().item()
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return {"grad_cosine": Fn.cosine_similarity(used, exact, dim=0).item(),
            "grad_norm_used": used.norm().item(), "grad_norm_exact": exact.norm().item(),
            "grad_used_s": used_s, "grad_implicit_s": implicit_s,
            "backward_speedup": implicit_s / used_s,
            "rho_dF_dh": rho, "rho_dFlam_dh": rho_lam}


# --- the loop --------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    from pipeline.io import atomic_path
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(cfg: TrainConfig, data: dict, tracker, checkpoint: Path | None = None,
          log=print) -> dict:
    """Train; return the results dict (also on divergence, with status "failed").

    ``tracker`` is a :mod:`pipeline.tracking` run; ``checkpoint`` the file to resume
    from and save to at each epoch end.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    x_train, y_train = data["train"]
    model, opt = build(cfg, data["meta"])
    steps_per_epoch = len(y_train) // cfg.batch_size
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    sched = make_scheduler(cfg, opt, cfg.epochs * steps_per_epoch)
    state = {"epoch": 0, "step": 0, "best_acc": 0.0, "best_epoch": 0, "history": [], "curves": []}
    if checkpoint is not None and checkpoint.exists():
        ck = torch.load(checkpoint, map_location=cfg.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        state = ck["state"]
        log(f"resumed from {checkpoint} at epoch {state['epoch']}")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracker.set_tags({"trainable_params": n_params})
    log(f"MDEQ-Tiny: {n_params:,} trainable parameters, {steps_per_epoch} steps per epoch")
    model.train()
    status, reason, rows = "finished", "", []
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            t_epoch = time.perf_counter()
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(cfg.device)  # peak memory is per epoch
            rows = []
            epoch_batches = itertools.islice(
                batches(len(y_train), cfg.batch_size, cfg.seed, epoch), steps_per_epoch)
            for idx in progress(epoch_batches, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}",
                                every=30.0):
                step = state["step"]
                pretraining = step < cfg.pretrain_steps
                est = cfg.pretrain_config if pretraining else cfg.estimator_config
                x, y = x_train[idx], y_train[idx]
                t0 = clock(cfg.device)
                logits, stats = model(x, cfg.forward_solver, est)
                loss = Fn.cross_entropy(logits, y)
                t1 = clock(cfg.device)
                if not math.isfinite(loss.item()):
                    raise Divergence(f"non-finite loss {loss.item()} at step {step}")
                if stats.diverged:
                    raise Divergence(f"forward solver: {stats.reason} at step {step}")
                if not pretraining and stats.rel_residual > cfg.diverge_residual:
                    raise Divergence(f"forward residual {stats.rel_residual:.3g} > "
                                     f"{cfg.diverge_residual:g} at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = clock(cfg.device)
                opt.step()
                sched.step()
                t3 = clock(cfg.device)
                row = {"loss": loss.item(), "train_acc": (logits.argmax(1) == y).float().mean().item(),
                       "lr": opt.param_groups[0]["lr"], "forward_steps": stats.nstep,
                       "forward_rel_residual": stats.rel_residual if stats.rel_trace else float("nan"),
                       "forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t3 - t0,
                       "pretraining": float(pretraining)}
                if cfg.diagnostics_every and step % cfg.diagnostics_every == 0:
                    row.update(diagnostics(model, cfg, est, x, y))
                rows.append((step, row))
                state["step"] += 1
            acc = evaluate(model, cfg, *data["test"])
            epoch_s = time.perf_counter() - t_epoch
            if acc > state["best_acc"]:
                state["best_acc"], state["best_epoch"] = acc, epoch + 1
            state["epoch"] = epoch + 1
            state["history"].append({"epoch": epoch + 1, "test_acc": acc, "epoch_s": epoch_s,
                                     "peak_memory_mb": peak_memory_mb(cfg.device)})
            _record_rows(tracker, state, rows)
            tracker.log_metrics({"test_acc": acc, "best_test_acc": state["best_acc"],
                                 "epoch_s": epoch_s,
                                 "peak_memory_mb": state["history"][-1]["peak_memory_mb"]},
                                step=epoch + 1)
            log(f"epoch {epoch + 1}/{cfg.epochs}: test acc {acc:.4f} (best {state['best_acc']:.4f}),"
                f" loss {rows[-1][1]['loss']:.4f}, {epoch_s:.1f}s")
            if checkpoint is not None:
                save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                             "scheduler": sched.state_dict(),
                                             "rng": torch.get_rng_state(), "state": state,
                                             "run_id": tracker.run_id})
    except Divergence as err:
        _record_rows(tracker, state, rows)
        status, reason = "failed", str(err)
        log(f"DIVERGED: {reason}")
        tracker.fail(reason)
    return _results(cfg, state, status, reason, n_params)


def _record_rows(tracker, state: dict, rows: list) -> None:
    """An epoch's step rows go to MLflow (batched) and to the curves kept in the state."""
    state["curves"] += [{"step": s, **row} for s, row in rows]
    if not rows:
        return
    keys = sorted({k for _, row in rows for k in row})
    steps = [s for s, _ in rows]
    tracker.log_curves({k: [row.get(k, float("nan")) for _, row in rows] for k in keys}, steps)


def _results(cfg: TrainConfig, state: dict, status: str, reason: str, n_params: int) -> dict:
    hist = state["history"]
    trained = [r for r in state["curves"] if not r["pretraining"]]  # the estimator's own steps
    n = max(1, len(trained))
    mean = {key: sum(r[key] for r in trained) / n for key in ("forward_s", "backward_s", "step_s")}
    speedups = [r["backward_speedup"] for r in trained if "backward_speedup" in r]
    return {
        "status": status, "reason": reason, "dataset": cfg.dataset,
        "estimator": cfg.estimator, "k": cfg.k, "lam": cfg.lam,
        "pretrain_steps": cfg.pretrain_steps, "dropout": cfg.dropout, "optimizer": cfg.optimizer,
        "epochs_completed": state["epoch"], "epochs": cfg.epochs, "steps": state["step"],
        "best_test_acc": state["best_acc"] if hist else None, "best_epoch": state["best_epoch"],
        "final_test_acc": hist[-1]["test_acc"] if hist else None,
        "time_per_epoch_s": sum(h["epoch_s"] for h in hist) / len(hist) if hist else None,
        "peak_memory_mb": max((h["peak_memory_mb"] for h in hist), default=None),
        "mean_forward_s": mean["forward_s"], "mean_backward_s": mean["backward_s"],
        "mean_step_s": mean["step_s"], "trainable_params": n_params,
        # same batch, same h*: implicit (b_thres) gradient time / this estimator's
        "backward_speedup_vs_implicit": sum(speedups) / len(speedups) if speedups else None,
        "history": hist, "curves": state["curves"],
    }


# --- CLI edge --------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="ablation name (ablations.runs.<name>)")
    parser.add_argument("--params", required=True, help="merged ablation params, JSON")
    parser.add_argument("--data", required=True, help="data/<dataset> directory")
    parser.add_argument("--out", required=True, help="results/ablations/<name>")
    parser.add_argument("--checkpoints", default="checkpoints/ablations")
    parser.add_argument("--scale", default="default")
    parser.add_argument("--tracking-uri", default="none")
    parser.add_argument("--artifacts", default="mlruns/artifacts")
    parser.add_argument("--tags", default="{}")
    parser.add_argument("--threads", type=int, default=0)


def main(args) -> int:
    from pipeline import tracking
    from pipeline.config import params_hash
    from pipeline.io import write_csv, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    cfg = TrainConfig.from_params(params)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"ablation {args.name}: device={cfg.device!r} but no CUDA device is "
                         "visible; run the paper scale on a GPU node (profiles/slurm) or set "
                         "ablations.defaults.device: cpu")
    phash = params_hash(params)
    checkpoint = Path(args.checkpoints) / args.name / phash / "last.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    run_id = None
    if checkpoint.exists():
        run_id = torch.load(checkpoint, map_location="cpu", weights_only=False).get("run_id")
    data = load_tensors(args.data, cfg.device)
    if data["meta"]["name"] != cfg.dataset:
        raise ValueError(f"--data {args.data} holds {data['meta']['name']!r}, but the ablation's "
                         f"dataset is {cfg.dataset!r}")
    tags = {"study": "ablations", "ablation": args.name, "scale": args.scale,
            "dataset": data["meta"]["name"], "params_hash": phash, **json.loads(args.tags)}
    with tracking.start_run(args.tracking_uri, "ablations", args.name, tags,
                            {"ablation": dataclasses.asdict(cfg), "name": args.name,
                             "scale": args.scale},
                            args.artifacts, run_id=run_id) as tracker:
        results = train(cfg, data, tracker, checkpoint,
                        log=lambda msg: print(msg, flush=True))
        results.update(name=args.name, scale=args.scale, params_hash=phash,
                       mlflow_run_id=tracker.run_id)
        out = Path(args.out)
        write_csv(pd.DataFrame(results.pop("curves")), out / "curves.csv")
        write_json(results, out / "metrics.json")
        tracker.log_artifact(out / "metrics.json")
        tracker.log_artifact(out / "curves.csv")
    # The run has concluded: its checkpoint only served an interrupted job, and must not
    # turn a later forced rerun (say, after a code change) into a no-op resume.
    shutil.rmtree(checkpoint.parent, ignore_errors=True)
    if not any(checkpoint.parent.parent.iterdir()):
        checkpoint.parent.parent.rmdir()
    print(f"{args.name}: {results['status']} {results['reason']} best acc {results['best_test_acc']}")
    return 0
