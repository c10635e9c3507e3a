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


def export_digits_imagefolder(out_dir: str | Path, test_fraction: float = 0.2, seed: int = 0,
                              size: int = 32) -> dict:
    """The digits as an ImageFolder tree: the default scale's stand-in for ImageNet.

    ``out_dir/{train,val}/<digit>/<index>.png``: each 8x8 digit upscaled to ``size`` x
    ``size`` (nearest, so the strokes stay sharp) and repeated over 3 channels (RGB), the
    split the same as :func:`export_digits` (same fraction and seed, same images), plus
    ``out_dir/manifest.json`` (:func:`pipeline.data.imagenet.scan_imagenet`, with the file
    list, sizes and sha256 checksums, and ``root`` "." : the manifest's own folder). The
    ImageNet-style runs read it through the same ImageFolder loader as ImageNet.

        python -m pipeline data digits-imagefolder --out data/digits_imagefolder --size 32
    """
    from PIL import Image
    from sklearn.model_selection import train_test_split

    from pipeline.io import write_json

    from .download import replace_dir, temp_sibling
    from .imagenet import scan_imagenet

    if size % 8:
        raise ValueError(f"size={size} must be a multiple of the digits' 8 pixels")
    out_dir = Path(out_dir)
    images, labels = digits_arrays()
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=test_fraction, random_state=seed,
                                           shuffle=True, stratify=labels)
    with temp_sibling(out_dir, directory=True) as tmp:
        for split, idx in (("train", train_idx), ("val", test_idx)):
            for i in idx:
                folder = tmp / split / str(labels[i])
                folder.mkdir(parents=True, exist_ok=True)
                gray = Image.fromarray(images[i, :, :, 0], mode="L").resize((size, size),
                                                                          Image.NEAREST)
                # PNG without a timestamp: the same digits give the same bytes (DVC hashes)
                gray.convert("RGB").save(folder / f"{i:04d}.png", optimize=False)
        manifest = scan_imagenet(tmp, checksums=True, name="digits_imagefolder")
        manifest["root"] = "."
        manifest["source"] = (f"sklearn.datasets.load_digits, {size}x{size} RGB (nearest), "
                              f"stratified split test_fraction={test_fraction} seed={seed}")
        write_json(manifest, tmp / "manifest.json")
        replace_dir(tmp, out_dir)
    print(f"digits_imagefolder: {manifest['n_train']} train / {manifest['n_val']} val "
          f"{size}x{size} RGB -> {out_dir}")
    return manifest
