"""The ``imagefolder`` task: MDEQ on an ImageFolder tree (ImageNet, appendix §4.3).

The tree is the one a manifest describes (``<data dir>/manifest.json``, written by
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
from pipeline.experiments.tasks import ImageTask, epoch_order, rank_batches, register_task

Tensor = torch.Tensor

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


@register_task("imagefolder")
class ImageFolderTask(ImageTask):
    """Image classification on an ImageFolder tree; the loss, the pretraining estimator
    and the top-1 / top-5 sums are :class:`~pipeline.experiments.tasks.ImageTask`'s."""

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
