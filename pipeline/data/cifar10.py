"""CIFAR-10 from the official python-version archive (``cifar-10-python.tar.gz``).

The archive comes from one of three places, in this order of preference:

1. ``--archive PATH``: a local copy (checked against the md5, never copied);
2. ``--url`` then ``--mirror``: streamed to a temporary file next to the output,
   checked against the md5, deleted once converted;
3. neither works: a :class:`DataError` saying what to set, or to ``dvc pull``.

The archive holds ``cifar-10-batches-py/data_batch_1..5``, ``test_batch`` and
``batches.meta``: pickled dicts (keys are bytes) with ``b'data'`` uint8 (10000, 3072),
each row the 32x32 red plane, then green, then blue, row-major (channels first);
``b'labels'`` a list of ints; ``batches.meta`` has ``b'label_names'``.
See https://www.cs.toronto.edu/~kriz/cifar.html.

    python -m pipeline data cifar10 --out data/cifar10 \\
        --url https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz \\
        --md5 c58f30108f718f92721af3b95e74349a [--mirror URL] [--archive PATH]
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from .download import DataError, Limits, extract_archive, fetch, temp_sibling, verify_checksum
from pipeline.io import prune_empty_dirs

from .layout import write_dataset

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
HINT = ("To get CIFAR-10 another way: set data.cifar10.mirror in params.yaml to a second "
        f"URL, or data.cifar10.archive to a local copy of {ARCHIVE}, or restore "
        "data/cifar10 with `dvc pull data@cifar10` (see docs/data.md).")


def _unpickle(path: Path) -> dict:
    # Safe only because the archive's md5 was checked first: pickle runs code.
    # The batches were pickled by Python 2; encoding="bytes" is what the dataset's
    # page prescribes (str keys come back as bytes). Keys are normalised to str.
    with open(path, "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_batches(folder: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode batches into ``(images uint8 (N, 32, 32, 3), labels int64 (N,))``."""
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing from the archive; is it {ARCHIVE}?")
        batch = _unpickle(path)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NCHW -> NHWC
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_classes(folder: Path) -> list[str]:
    meta = _unpickle(folder / "batches.meta")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]


def convert(archive: Path, out_dir: Path, md5: str) -> dict:
    """Extract a verified archive next to ``out_dir`` and write the dataset layout."""
    with temp_sibling(out_dir, directory=True) as work:
        extracted = extract_archive(archive, work / "extracted")
        folder = extracted / FOLDER
        if not folder.is_dir():
            raise DataError(f"{archive}: no {FOLDER}/ inside; is it {ARCHIVE}?")
        train = read_batches(folder, TRAIN_BATCHES)
        test = read_batches(folder, TEST_BATCHES)
        classes = read_classes(folder)
        # `source` names the content (by its md5), not the route it took: the same
        # archive from the mirror or a local copy gives the same meta.json bytes.
        return write_dataset(out_dir, name="cifar10", classes=classes, train=train, test=test,
                             source=f"{ARCHIVE} (md5 {md5}), python version")


def prepare_cifar10(out_dir: str | Path, *, url: str, md5: str, mirror: str | None = None,
                    archive: str | Path | None = None, limits: Limits = Limits()) -> dict:
    """Obtain, verify and export CIFAR-10 to ``out_dir`` (``data/cifar10``).

    Args:
        out_dir: destination folder, replaced atomically.
        url: the official archive URL; mirror: a second URL tried after it.
        md5: the archive's md5 (``c58f30108f718f92721af3b95e74349a`` for the official file).
        archive: a local copy; when given, no download is attempted.
        limits: the download's timeout, deadline and minimum rate.

    Raises:
        DataError: unreachable URLs, wrong checksum, truncated or malformed archive.
            Nothing is left behind: no partial download, no partial ``out_dir``.
    """
    out_dir = Path(out_dir)
    prune_empty_dirs(out_dir)
    try:
        if archive:
            archive = Path(archive)
            verify_checksum(archive, ("md5", md5))
            print(f"cifar10: using local archive {archive} (md5 ok)")
            meta = convert(archive, out_dir, md5)
        else:
            with temp_sibling(out_dir, directory=True) as download:
                path = fetch([url, mirror or ""], download / ARCHIVE, ("md5", md5),
                             limits=limits)
                meta = convert(path, out_dir, md5)
    except DataError as err:
        raise DataError(f"{err}\n{HINT}") from err
    print(f"cifar10: {meta['n_train']} train / {meta['n_test']} test -> {out_dir}")
    return meta
