"""ImageNet: validate a user-provided ImageFolder tree and write a small manifest.

ImageNet cannot be downloaded without an account, so the pipeline never fetches
it. Point ``data.imagenet.root`` at a tree laid out as torchvision's
``ImageFolder`` expects::

    <root>/train/<class>/<image>.JPEG
    <root>/val/<class>/<image>.JPEG

The check is structural: it lists file names and opens one image per class and
split, never the 1.28M images themselves. The manifest
(``data/imagenet/manifest.json``) records the classes, the per-class counts, the
root and every file with its size in bytes (``files``: per split, ``[path, bytes]``
relative to the split folder, sorted; with ``--checksums`` ``[path, bytes, sha256]``,
which reads every image: hours for ImageNet). DVC versions the manifest, not the
images, so a changed, added or removed image changes the manifest's hash.

    python -m pipeline data imagenet --root /datasets/imagenet \
        --manifest data/imagenet/manifest.json [--checksums]

The same scan writes the manifest of the default scale's stand-in, the digits as a
32x32 RGB ImageFolder tree (:func:`pipeline.data.digits.export_digits_imagefolder`).
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.io import write_json

from .download import DataError, file_digest
from pipeline.io import prune_empty_dirs

SPLITS = ("train", "val")
# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HINT = ("Set data.imagenet.root in params.yaml to a folder with train/ and val/, each "
        "holding one sub-folder of images per class (torchvision ImageFolder layout).")


def _images(folder: Path) -> list[tuple[str, int]]:
    """(name, size in bytes) of the images in ``folder``, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted((e.name, e.stat().st_size) for e in entries
                      if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


def _check_opens(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err


def scan_imagenet(root: str | Path, checksums: bool = False, name: str = "imagenet") -> dict:
    """Check the ImageFolder tree at ``root``; return the manifest (``name`` its dataset).

    Raises:
        DataError: root missing, a split missing, no classes, a class folder
            without images, different classes in train and val, or an image that
            PIL cannot open and verify (one per class and split is checked).
    """
    if not root:
        raise DataError(f"data.imagenet.root is not set. {HINT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.imagenet.root: {root} is not a directory. {HINT}")
    counts: dict[str, dict[str, int]] = {}
    files: dict[str, list] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: missing. {HINT}")
        classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
        if not classes:
            raise DataError(f"{split_dir}: no class folders. {HINT}")
        counts[split], files[split] = {}, []
        for label in classes:
            images = _images(split_dir / label)
            if not images:
                raise DataError(f"{split_dir / label}: no images ({', '.join(IMG_EXTENSIONS)}). "
                                f"{HINT}")
            _check_opens(split_dir / label / images[0][0])
            counts[split][label] = len(images)
            for image, size in images:
                entry = [f"{label}/{image}", size]
                if checksums:
                    entry.append(file_digest(split_dir / label / image, "sha256"))
                files[split].append(entry)
    train, val = set(counts["train"]), set(counts["val"])
    if train != val:
        only_train, only_val = sorted(train - val)[:5], sorted(val - train)[:5]
        raise DataError(f"{root}: train and val have different classes (only in train: "
                        f"{only_train}, only in val: {only_val}). {HINT}")
    classes = sorted(train)
    return {
        "name": name,
        "root": str(root.resolve()),
        "num_classes": len(classes),
        "classes": classes,
        "counts": counts,
        "n_train": sum(counts["train"].values()),
        "n_val": sum(counts["val"].values()),
        "bytes": sum(entry[1] for split in SPLITS for entry in files[split]),
        "checksums": "sha256" if checksums else None,
        "files": files,
    }


def validate_imagenet(root: str | Path | None, manifest: str | Path,
                      checksums: bool = False) -> dict:
    """Validate the tree and write ``manifest`` (atomically); nothing is written on failure."""
    manifest = Path(manifest)
    try:
        result = scan_imagenet(root, checksums)
    except DataError:
        prune_empty_dirs(manifest.parent)
        raise
    write_json(result, manifest)
    print(f"imagenet: {result['num_classes']} classes, {result['n_train']} train / "
          f"{result['n_val']} val images at {result['root']} -> {manifest}")
    return result
