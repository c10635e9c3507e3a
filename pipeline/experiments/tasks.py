"""Task registry: what the shared training loop needs to know about one kind of data.

A task builds its model from a run's ``model:`` block, yields batches for
(split, epoch, rank, world size), computes the loss and metrics of a batch, and
evaluates a split; it names its primary metric. The loop (:mod:`.train`) knows
nothing else of the study. Registered now: ``image`` (MDEQ on an image dataset in
the npz layout of :mod:`pipeline.data.layout`), ``imagefolder`` (MDEQ on an ImageFolder
tree, ImageNet, in :mod:`.vision_tasks`), ``graph`` and ``node`` (IGNN, in
:mod:`.graph_tasks`), ``lm`` (the DEQ-Transformer, in :mod:`.lm_tasks`). A task with a
``repeats(data, seed)`` static method (folds, seeds) is trained once per unit by
``python -m pipeline train-repeats`` (:mod:`.repeats`).

>>> sorted(TASKS)
['graph', 'image', 'imagefolder', 'lm', 'node']
>>> get_task("text")
Traceback (most recent call last):
...
ValueError: unknown task 'text'; valid tasks: ['graph', 'image', 'imagefolder', 'lm', 'node']
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as Fn
from torch import nn

from pipeline.deq import EstimatorConfig, SolverConfig

Tensor = torch.Tensor

TASKS: dict[str, type] = {}


def register_task(name: str):
    def deco(cls):
        cls.name = name
        TASKS[name] = cls
        return cls
    return deco


def get_task(name: str) -> type:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}") from None


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """A fixed permutation per (seed, epoch): deterministic, resumable without saved state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def rank_batches(order: Tensor, batch_size: int, rank: int, world_size: int) -> Iterator[Tensor]:
    """Rank ``rank``'s batches of ``order``: global step s takes the s-th block of
    batch_size x world_size indices, and this rank its slice. The last partial block is
    dropped, as MDEQ does."""
    block = batch_size * world_size
    for i in range(0, len(order) - block + 1, block):
        yield order[i + rank * batch_size:i + (rank + 1) * batch_size]


@register_task("image")
class ImageTask:
    """Image classification with MDEQ (appendix §4.2, §4.3), cross-entropy, accuracy.

    ``model``: an :class:`~pipeline.models.mdeq.MDEQConfig` block (``preset`` plus
    overrides); channels, classes and image size come from the dataset. ``data``:
    ``dataset`` (the name in data/<dataset>/meta.json); ``crop_padding`` and ``flip``, the
    CIFAR augmentation of MDEQ and phantom_grad (random crop after zero padding by 4,
    horizontal flip; appendix §4.3), both off by default (the ablation protocol); ``top5``
    adds top-5 accuracy. Images are normalised by the training split's per-channel
    statistics; the padding is black (the normalised 0), as torchvision pads before
    normalising. The augmentation is seeded tensor ops (:func:`augment`).
    """

    primary_metric = "acc"
    higher_is_better = True
    eval_split = "test"

    def __init__(self, model: dict, data: dict, data_dir: str | Path, device: str,
                 batch_size: int, eval_batch_size: int, seed: int):
        from pipeline.models.mdeq import MDEQConfig
        self.device, self.batch_size, self.eval_batch_size = device, batch_size, eval_batch_size
        self.seed = seed
        self.top5 = bool(data.get("top5", False))
        self.crop_padding, self.flip = int(data.get("crop_padding", 0)), bool(data.get("flip", False))
        self.data = load_images(data_dir, device)
        meta = self.data["meta"]
        if data.get("dataset") and meta["name"] != data["dataset"]:
            raise ValueError(f"--data {data_dir} holds {meta['name']!r}, but the run's dataset "
                             f"is {data['dataset']!r}")
        self.dataset = meta["name"]
        H, _, C = meta["image_shape"]
        self.model_config = MDEQConfig.from_params(model, in_channels=C,
                                                   num_classes=meta["num_classes"], image_size=H)

    def build_model(self) -> nn.Module:
        from pipeline.models.mdeq import MDEQ
        return MDEQ(self.model_config).to(self.device)

    def pretrain_estimator(self, model) -> EstimatorConfig:
        """MDEQ's weight-tied unrolled pretraining with the model's NUM_LAYERS."""
        return EstimatorConfig("unrolled", k=model.config.num_layers)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return len(self.data["train"][1]) // (self.batch_size * world_size)

    def batches(self, split: str, epoch: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.data[split]
        if split == "train":
            order = epoch_order(len(labels), self.seed, epoch)
            for step, idx in enumerate(rank_batches(order, self.batch_size, rank, world_size)):
                x = images[idx]
                if self.crop_padding or self.flip:
                    x = augment(x, self.data["black"], self.crop_padding, self.flip,
                                self.seed, epoch, step, rank, world_size)
                yield x, labels[idx]
            return
        for i in range(rank * self.eval_batch_size, len(labels), self.eval_batch_size * world_size):
            yield images[i:i + self.eval_batch_size], labels[i:i + self.eval_batch_size]

    def loss(self, model, batch, solver: SolverConfig, estimator: EstimatorConfig
             ) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        logits, _ = model(x, solver, estimator)
        loss = Fn.cross_entropy(logits, y)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().item()}

    def evaluate(self, model, solver: SolverConfig, estimator: EstimatorConfig,
                 split: str | None = None) -> dict[str, float]:
        """Accuracy on ``split`` (default the test split), in eval mode."""
        return self.from_sums(self.evaluate_sums(model, solver, estimator, split))

    @torch.no_grad()
    def evaluate_sums(self, model, solver: SolverConfig, estimator: EstimatorConfig,
                      split: str | None = None, rank: int = 0, world_size: int = 1
                      ) -> dict[str, float]:
        """Correct predictions (top-1 and top-5) and samples in rank ``rank``'s shard of
        ``split``; the loop adds these up over ranks (:func:`from_sums`)."""
        was_training = model.training
        model.eval()
        correct = correct5 = total = 0
        for x, y in self.batches(split or self.eval_split, 0, rank, world_size):
            logits, _ = model(x, solver, estimator)
            correct += (logits.argmax(1) == y).sum().item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            total += len(y)
        model.train(was_training)
        return {"correct": correct, "correct5": correct5, "count": total}

    def from_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Accuracy (and, with ``data.top5``, top-5 accuracy) from :func:`evaluate_sums`."""
        out = {"acc": sums["correct"] / sums["count"]}
        if self.top5:
            out["top5"] = sums["correct5"] / sums["count"]
        return out


def augment(x: Tensor, black: Tensor, padding: int, flip: bool, seed: int, epoch: int,
            step: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Random crop of ``x`` (B, C, H, W) after padding every side by ``padding`` pixels
    with ``black``, and, if ``flip``, a horizontal flip with probability 1/2.

    The draws come from a generator seeded by (seed, epoch, step) for the whole global batch
    of ``world_size`` x B samples, of which this rank takes its slice: one process on the
    global batch and N ranks on their slices see the same images, and a resumed run the
    images of an uninterrupted one.
    """
    bsz, _, height, width = x.shape
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + step)
    offsets = torch.randint(0, 2 * padding + 1, (world_size * bsz, 2), generator=gen)
    flips = torch.rand(world_size * bsz, generator=gen) < 0.5
    mine = slice(rank * bsz, (rank + 1) * bsz)
    offsets, flips = offsets[mine].tolist(), flips[mine].tolist()
    if padding:
        padded = black.expand(bsz, -1, height + 2 * padding, width + 2 * padding).clone()
        padded[:, :, padding:padding + height, padding:padding + width] = x
        x = torch.stack([padded[i, :, dy:dy + height, dx:dx + width]
                         for i, (dy, dx) in enumerate(offsets)])
    if flip:
        x = torch.stack([img.flip(-1) if f else img for img, f in zip(x, flips)])
    return x


def load_images(data_dir: str | Path, device: str) -> dict:
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
    out["black"] = ((0.0 - mean) / std).to(device)  # (1, C, 1, 1): a zero pixel, normalised
    return out


from pipeline.experiments import graph_tasks as _graph_tasks  # noqa: E402,F401  (registers graph, node)
from pipeline.experiments import vision_tasks as _vision_tasks  # noqa: E402,F401  (registers imagefolder)
from pipeline.experiments import lm_tasks as _lm_tasks  # noqa: E402,F401  (registers lm)
