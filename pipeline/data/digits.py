"""scikit-learn's digits, the embedded default dataset (ships inside scikit-learn; offline).

1,797 greyscale 8x8 images of the digits 0-9 with pixel values 0..16, scaled
to 0..255 (``round(v * 255 / 16)``) and split into train and test with a
stratified split, so each class keeps its share in both.

    python -m pipeline data digits --out data/digits --test-fraction 0.2 --seed 0
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .layout import write_dataset


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(images uint8 (1797, 8, 8, 1), labels int64 (1797,))``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # load_digits stores 0..16 as float64; round-half-even on exact values is deterministic.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


def export_digits(out_dir: str | Path, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write data/digits in the dataset layout (see :mod:`pipeline.data.layout`).

    Args:
        out_dir: destination folder, replaced atomically.
        test_fraction: share of each class held out for the test split, in (0, 1).
        seed: seed of the stratified shuffle; same seed, same bytes.

    Returns:
        The metadata written to ``meta.json``.
    """
    import sklearn
    from sklearn.model_selection import train_test_split

    images, labels = digits_arrays()
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=test_fraction, random_state=seed,
                                           shuffle=True, stratify=labels)
    meta = write_dataset(
        out_dir, name="digits", classes=[str(d) for d in range(10)],
        train=(images[train_idx], labels[train_idx]),
        test=(images[test_idx], labels[test_idx]),
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}); stratified "
               f"split test_fraction={test_fraction} seed={seed}")
    print(f"digits: {meta['n_train']} train / {meta['n_test']} test -> {out_dir}")
    return meta
