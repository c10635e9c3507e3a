"""The embedded default dataset: scikit-learn's digits in the dataset layout, and the loaders."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.data import DataError, load_meta, load_split
from pipeline.data.digits import digits_arrays, export_digits

FILES = ("train.npz", "test.npz", "meta.json")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    args = ["data", "digits", "--out", str(out), "--test-fraction", "0.2", "--seed", "0"]
    assert cli_main(args) == 0
    return out


def test_layout_shapes_and_dtypes(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(FILES)
    meta = load_meta(exported)
    assert meta["name"] == "digits"
    assert meta["classes"] == [str(d) for d in range(10)] and meta["num_classes"] == 10
    assert meta["image_shape"] == [8, 8, 1]
    assert (meta["n_train"], meta["n_test"]) == (1437, 360)  # 1,797 with a 20 % test share
    assert "load_digits" in meta["source"]
    for split, n in (("train", 1437), ("test", 360)):
        images, labels = load_split(exported, split, verify=True)
        assert images.dtype == torch.uint8 and tuple(images.shape) == (n, 8, 8, 1)
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (n,)
        assert meta["sha256"][f"{split}.npz"] == hashlib.sha256(
            (exported / f"{split}.npz").read_bytes()).hexdigest()
        with np.load(exported / f"{split}.npz") as npz:  # plain numpy reads it too
            assert sorted(npz.files) == ["images", "labels"]


def test_pixels_are_scaled_to_0_255(exported):
    images, _ = load_split(exported, "train")
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(images.unique().tolist()) <= allowed
    assert images.min() == 0 and images.max() == 255
    all_images, all_labels = digits_arrays()
    from sklearn.datasets import load_digits
    raw = load_digits()
    assert np.array_equal(all_images[..., 0], np.rint(raw.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(all_labels, raw.target)


def test_split_is_stratified_and_disjoint(exported):
    train_images, train_labels = load_split(exported, "train")
    test_images, test_labels = load_split(exported, "test")
    total = np.bincount(np.concatenate([train_labels.numpy(), test_labels.numpy()]), minlength=10)
    in_test = np.bincount(test_labels.numpy(), minlength=10)
    assert np.all(np.abs(in_test - 0.2 * total) <= 1), (in_test, total)
    # Every image lands in exactly one split: the two splits together are the whole set.
    all_images, _ = digits_arrays()
    together = np.concatenate([train_images.numpy(), test_images.numpy()])
    key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
    assert key(together) == key(all_images)


def test_same_seed_same_bytes(exported, tmp_path):
    again = tmp_path / "digits"
    export_digits(again, test_fraction=0.2, seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name
    other = tmp_path / "other"
    export_digits(other, test_fraction=0.2, seed=1)
    assert (other / "test.npz").read_bytes() != (exported / "test.npz").read_bytes()


def test_npz_members_carry_a_fixed_timestamp(exported):
    with zipfile.ZipFile(exported / "train.npz") as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_export_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "digits"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    export_digits(out, test_fraction=0.5, seed=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert load_meta(out)["n_test"] == 899
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temporary folders left


def test_loaders_fail_clearly(exported, tmp_path):
    with pytest.raises(DataError, match="dvc pull"):
        load_split(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="no meta.json"):
        load_meta(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(exported, "val")
    tampered = tmp_path / "tampered"
    export_digits(tampered, test_fraction=0.2, seed=0)
    blob = bytearray((tampered / "test.npz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one pixel
    (tampered / "test.npz").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="sha256 differs"):
        load_split(tampered, "test", verify=True)
