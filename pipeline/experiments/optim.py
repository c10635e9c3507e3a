"""The optimizer and the learning-rate schedule of a training run (:class:`TrainConfig`'s
``optimizer``, ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``schedule``,
``warmup_steps``, ``lr_decay_epochs``, ``lr_decay_factor``)."""
from __future__ import annotations

import torch

from pipeline.experiments.train_config import TrainConfig


def make_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    raise ValueError(f"optimizer {cfg.optimizer!r}; valid: ['adam', 'sgd']")


SCHEDULES = ("cosine", "constant", "multistep")


def make_scheduler(cfg: TrainConfig, opt, total_steps: int, steps_per_epoch: int = 1):
    after = max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":  # MDEQ: cosine annealing over all iterations
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, after, eta_min=1e-6)
    elif cfg.schedule == "constant":
        main = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    elif cfg.schedule == "multistep":  # IGNN: lr halved once 50 epochs are done (epoch 51)
        main = torch.optim.lr_scheduler.MultiStepLR(
            opt, [e * steps_per_epoch - cfg.warmup_steps for e in cfg.lr_decay_epochs],
            gamma=cfg.lr_decay_factor)
    else:
        raise ValueError(f"schedule {cfg.schedule!r}; valid: {list(SCHEDULES)}")
    if not cfg.warmup_steps:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / cfg.warmup_steps,
                                             total_iters=cfg.warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], [cfg.warmup_steps])

