"""The on-disk layout every image dataset is exported to (the training code reads only this).

::

    data/<name>/train.npz   images uint8 (N, H, W, C), labels int64 (N,)
    data/<name>/test.npz    same
    data/<name>/meta.json   {name, num_classes, classes, image_shape [H, W, C],
                             n_train, n_test, source, sha256: {train.npz, test.npz}}

:func:`write_dataset` builds the three files in a temporary folder next to
``data/<name>`` and renames the folder into place, so a reader sees either the
old dataset or the new one, never a mix. The ``.npz`` files are written with a
fixed zip timestamp: the same arrays give the same bytes (DVC hashes stay put).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline.io import prune_empty_dirs

from .download import DataError, file_digest, replace_dir, temp_sibling

SPLITS = ("train", "test")
FILES = ("train.npz", "test.npz", "meta.json")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest timestamp; np.savez would stamp "now"


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` with deterministic bytes (fixed member timestamps, stored, sorted)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]),
                                          allow_pickle=False)


def write_dataset(out_dir: str | Path, *, name: str, classes: list[str],
                  train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  source: str) -> dict:
    """Write ``train.npz``, ``test.npz`` and ``meta.json`` to ``out_dir`` atomically.

    Args:
        out_dir: ``data/<name>``; replaced as a whole if it exists.
        train, test: ``(images uint8 (N, H, W, C), labels int64 (N,))``.
        source: where the data came from (stable text: no local paths or dates).

    Returns:
        The metadata written to ``meta.json``.
    """
    out_dir = Path(out_dir)
    for split, (images, labels) in zip(SPLITS, (train, test)):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{split} images must be uint8 (N, H, W, C), got "
                             f"{images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"{split} labels must be int64 ({len(images)},), got "
                             f"{labels.dtype} {labels.shape}")
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ValueError(f"train and test image shapes differ: {train[0].shape[1:]} vs "
                         f"{test[0].shape[1:]}")
    prune_empty_dirs(out_dir)
    with temp_sibling(out_dir, directory=True) as tmp:
        for split, (images, labels) in zip(SPLITS, (train, test)):
            save_npz(tmp / f"{split}.npz", images=images, labels=labels)
        meta = {
            "name": name,
            "num_classes": len(classes),
            "classes": list(classes),
            "image_shape": list(train[0].shape[1:]),
            "n_train": int(len(train[1])),
            "n_test": int(len(test[1])),
            "source": source,
            "sha256": {f"{s}.npz": file_digest(tmp / f"{s}.npz", "sha256") for s in SPLITS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    return meta


def _missing(data_dir: Path, what: str) -> DataError:
    name = data_dir.name
    return DataError(f"{data_dir}: {what}. Create it with `snakemake --cores all "
                     f"{data_dir / 'meta.json'}` or restore it with `dvc pull data@{name}` "
                     "(see docs/data.md)")


def load_meta(data_dir: str | Path) -> dict:
    """The ``meta.json`` of an exported dataset, e.g. ``load_meta("data/digits")["classes"]``."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise _missing(Path(data_dir), "no meta.json")
    return json.loads(path.read_text())


def load_split(data_dir: str | Path, split: str, *, verify: bool = False):
    """One split as torch tensors.

    Args:
        data_dir: ``data/<name>``.
        split: ``"train"`` or ``"test"``.
        verify: also check the file's sha256 against ``meta.json`` (reads it twice).

    Returns:
        ``(images, labels)``: ``torch.uint8`` of shape (N, H, W, C) and ``torch.int64`` (N,).

    >>> images, labels = load_split("data/digits", "train")      # doctest: +SKIP
    >>> images.shape, images.dtype, labels.dtype                  # doctest: +SKIP
    (torch.Size([1437, 8, 8, 1]), torch.uint8, torch.int64)
    """
    import torch  # here, so `python -m pipeline data ...` does not pay for importing torch

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.npz"
    if not path.is_file():
        raise _missing(data_dir, f"no {split}.npz")
    if verify:
        expected = load_meta(data_dir)["sha256"][path.name]
        if file_digest(path, "sha256") != expected:
            raise DataError(f"{path}: sha256 differs from meta.json; re-export it or "
                            f"`dvc checkout data@{data_dir.name}`")
    with np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    return torch.from_numpy(images), torch.from_numpy(labels)


def dataset_digest(data_dir: str | Path) -> str:
    """sha256 of the bytes a run trains on, for its record (an MLflow dataset input): of the
    manifest alone where there is one (an ImageFolder tree: it lists every file with its
    size, and its sha256 with checksums), else of every file under ``data_dir``, with its
    relative path, in sorted order."""
    import hashlib
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    files = [manifest] if manifest.is_file() else \
        sorted(p for p in data_dir.rglob("*") if p.is_file() and ".partial-" not in p.name)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(data_dir).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
