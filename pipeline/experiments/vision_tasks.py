"""The vision tasks: ``image`` (MDEQ on an npz image dataset: digits, CIFAR-10) and
``imagefolder`` (MDEQ on an ImageFolder tree: ImageNet), appendix §4.2, §4.3.

``image`` reads the npz layout of :mod:`pipeline.data.layout` into memory (see
:class:`ImageTask`). For ``imagefolder`` the tree is the one a manifest describes (``<data dir>/manifest.json``, written by
``python -m pipeline data imagenet`` or ``... digits-imagefolder``; its ``root`` is the tree,
relative to the manifest's folder or absolute). torchvision's ``ImageFolder`` reads it:

* train: RandomResizedCrop to ``crop`` (area ``area_min``-1, aspect 0.8-1.25), then a
  horizontal flip with probability 1/2 if ``flip``;
* val (the evaluation split): resize the short side to ``resize``, centre crop ``crop``:
  224 / 256 at paper scale, as the official pipeline;
* both normalised by ImageNet's channel mean and std (the official constants).

The random transforms of a sample are seeded by (run seed, epoch, sample index), so an
epoch's images are the same whatever the number of ranks or loader workers, and a resumed
run sees the images an uninterrupted one saw. Metrics: top-1 (``acc``) and top-5 (``top5``).

``data`` keys: ``dataset`` (the manifest's name), ``crop``, ``resize``, ``area_min``,
``flip``, ``workers`` (DataLoader worker processes; 0 reads in the training process).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as Fn
from torch import nn

from pipeline.deq import EstimatorConfig, SolverConfig
from pipeline.experiments.sampling import epoch_order, rank_batches

Tensor = torch.Tensor


# --- image: an npz dataset (data/<dataset>/{train,test}.npz) ----------------------------------

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

    name = "image"
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


# --- imagefolder: an ImageFolder tree (ImageNet) ---------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT = (0.8, 1.25)  # RandomResizedCrop's aspect range for the vision study (issue 10)
DATA_KEYS = {"dataset", "crop", "resize", "area_min", "flip", "workers"}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class SeededImages(torch.utils.data.Dataset):
    """An ImageFolder whose item ``(epoch, index)`` draws its random transform from a
    generator seeded by (seed, epoch, index), leaving the global RNG untouched."""

    def __init__(self, folder, transform, seed: int):
        self.folder, self.transform, self.seed = folder, transform, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key
        path, label = self.folder.samples[index]
        image = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label


def read_manifest(data_dir: str | Path) -> tuple[dict, Path]:
    """The manifest and the tree's root (relative roots are relative to the manifest)."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; build it with `snakemake "
                                "export_digits_imagefolder` or `validate_imagenet`")
    manifest = json.loads(path.read_text())
    root = Path(manifest["root"])
    return manifest, (root if root.is_absolute() else path.parent / root)


class ImageFolderTask(ImageTask):
    """Image classification on an ImageFolder tree; the loss, the pretraining estimator
    and the top-1 / top-5 sums are :class:`ImageTask`'s."""

    name = "imagefolder"
    primary_metric = "acc"
    higher_is_better = True
    eval_split = "val"

    def __init__(self, model: dict, data: dict, data_dir: str | Path, device: str,
                 batch_size: int, eval_batch_size: int, seed: int):
        from torchvision import datasets, transforms as T

        from pipeline.models.mdeq import MDEQConfig
        unknown = sorted(set(data) - DATA_KEYS)
        if unknown:
            raise ValueError(f"unknown imagefolder data keys {unknown}; valid: {sorted(DATA_KEYS)}")
        self.device, self.batch_size, self.eval_batch_size = device, batch_size, eval_batch_size
        self.seed, self.top5 = seed, True
        self.workers = int(data.get("workers", 0))
        manifest, root = read_manifest(data_dir)
        if data.get("dataset") and manifest["name"] != data["dataset"]:
            raise ValueError(f"--data {data_dir} holds {manifest['name']!r}, but the run's "
                             f"dataset is {data['dataset']!r}")
        self.dataset = manifest["name"]
        crop, resize = int(data["crop"]), int(data["resize"])
        if resize < crop:
            raise ValueError(f"data.resize={resize} must be at least data.crop={crop}")
        normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        train = [T.RandomResizedCrop(crop, scale=(float(data.get("area_min", 0.1)), 1.0),
                                     ratio=ASPECT)]
        if data.get("flip", True):
            train.append(T.RandomHorizontalFlip())
        val = [T.Resize(resize), T.CenterCrop(crop)]
        self.splits = {}
        for split, ops in (("train", train), ("val", val)):
            folder = datasets.ImageFolder(str(root / split))
            if folder.classes != manifest["classes"] or len(folder) != manifest[f"n_{split}"]:
                raise ValueError(f"{root / split}: {len(folder.classes)} classes, {len(folder)} "
                                 f"images; the manifest says {manifest['num_classes']}, "
                                 f"{manifest[f'n_{split}']}: rebuild the manifest")
            self.splits[split] = SeededImages(folder, T.Compose(ops + normalise), seed)
        self.model_config = MDEQConfig.from_params(model, in_channels=3,
                                                   num_classes=manifest["num_classes"],
                                                   image_size=crop)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return len(self.splits["train"]) // (self.batch_size * world_size)

    def _load(self, dataset, keys: list) -> Iterator[tuple[Tensor, Tensor]]:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys,
                                             num_workers=self.workers)
        for x, y in loader:
            yield x.to(self.device), y.to(self.device)

    def batches(self, split: str, epoch: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = self.splits[split]
        n = len(dataset)
        if split == "train":
            order = epoch_order(n, self.seed, epoch)
            keys = [[(epoch, int(i)) for i in idx]
                    for idx in rank_batches(order, self.batch_size, rank, world_size)]
        else:
            size = self.eval_batch_size
            keys = [[(0, i) for i in range(start, min(start + size, n))]
                    for start in range(rank * size, n, size * world_size)]
        return self._load(dataset, keys)
