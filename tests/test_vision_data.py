"""The vision study's data: the digits ImageFolder export, the manifest's file list, the
ImageFolder loader (seeded transforms, sizes, top-1 / top-5) and the CIFAR augmentation.

Run: ``.venv/bin/python -m pytest tests/test_vision_data.py -q`` (CPU, seconds).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pipeline.data.digits import export_digits, export_digits_imagefolder
from pipeline.data.imagenet import validate_imagenet
from pipeline.deq import EstimatorConfig, SolverConfig
from pipeline.experiments.tasks import get_task
from pipeline.experiments.vision_tasks import augment

DATA = {"dataset": "digits_imagefolder", "crop": 32, "resize": 36, "area_min": 0.5,
        "flip": False}
MODEL = {"preset": "small_imagenet", "channels": [8, 16, 32, 64],
         "head_channels": [4, 8, 16, 32], "final_channels": 64, "num_layers": 2}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits_imagefolder"
    export_digits_imagefolder(out, 0.2, 0, size=32)
    return out


def _task(tree, data=None, batch_size=8, eval_batch_size=100, seed=0):
    return get_task("imagefolder")(MODEL, {**DATA, **(data or {})}, tree, "cpu", batch_size,
                                   eval_batch_size, seed)


def test_digits_imagefolder_tree_and_manifest(tree, tmp_path):
    manifest = json.loads((tree / "manifest.json").read_text())
    assert manifest["name"] == "digits_imagefolder" and manifest["root"] == "."
    assert manifest["classes"] == [str(d) for d in range(10)]
    # the same split as data/digits: 1,437 / 360
    digits = export_digits(tmp_path / "digits", 0.2, 0)
    assert (manifest["n_train"], manifest["n_val"]) == (digits["n_train"], digits["n_test"])
    for split in ("train", "val"):
        files = manifest["files"][split]
        assert len(files) == manifest[f"n_{split}"]
        for path, size, sha in files[:20]:
            image = tree / split / path
            assert image.stat().st_size == size
            assert hashlib.sha256(image.read_bytes()).hexdigest() == sha
    assert manifest["bytes"] == sum(f[1] for s in ("train", "val") for f in manifest["files"][s])
    from PIL import Image
    with Image.open(tree / "train" / manifest["files"]["train"][0][0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    again = tmp_path / "again"
    export_digits_imagefolder(again, 0.2, 0, size=32)
    assert (again / "manifest.json").read_text().replace(str(again), "") == \
        (tree / "manifest.json").read_text().replace(str(tree), ""), "same digits, same bytes"


def test_imagenet_manifest_file_list_and_optional_checksums(tree, tmp_path):
    plain = validate_imagenet(tree, tmp_path / "plain.json")
    assert plain["checksums"] is None and len(plain["files"]["train"][0]) == 2
    summed = validate_imagenet(tree, tmp_path / "summed.json", checksums=True)
    assert summed["checksums"] == "sha256" and len(summed["files"]["val"][0]) == 3
    assert [f[:2] for f in summed["files"]["val"]] == plain["files"]["val"]


def test_imagefolder_batches_sizes_and_seeded_transforms(tree):
    task = _task(tree, {"resize": 40})
    x, y = next(iter(task.batches("train", 0)))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)
    again, _ = next(iter(task.batches("train", 0)))
    assert torch.equal(x, again), "the same (seed, epoch, sample): the same crop"
    other, _ = next(iter(_task(tree, {"resize": 40}).batches("train", 1)))
    assert not torch.equal(x, other)
    # Two ranks' batches are the halves of one process's global batch.
    whole = _task(tree, {"resize": 40}, batch_size=16)
    gx, gy = next(iter(whole.batches("train", 3)))
    for rank in range(2):
        rx, ry = next(iter(task.batches("train", 3, rank, 2)))
        assert torch.equal(rx, gx[rank * 8:(rank + 1) * 8]) and torch.equal(ry, gy[rank * 8:(rank + 1) * 8])
    vx, _ = next(iter(task.batches("val", 0)))
    assert vx.shape == (100, 3, 32, 32)
    assert torch.equal(vx, next(iter(task.batches("val", 5)))[0]), "val: no randomness"
    assert task.steps_per_epoch(2) == 1437 // 16


def test_imagefolder_evaluation_top1_top5_and_shards(tree):
    task = _task(tree, eval_batch_size=64)
    torch.manual_seed(0)
    model = task.build_model()
    assert model.config.image_size == 32 and model.config.num_classes == 10
    solver, est = SolverConfig("broyden", 3, 1e-3), EstimatorConfig("upg", k=2)
    whole = task.evaluate_sums(model, solver, est)
    assert whole["count"] == 360 and whole["correct"] <= whole["correct5"] <= 360
    shards = [task.evaluate_sums(model, solver, est, rank=r, world_size=2) for r in range(2)]
    assert {k: sum(s[k] for s in shards) for k in whole} == whole
    values = task.from_sums(whole)
    assert set(values) == {"acc", "top5"} and values["top5"] >= values["acc"]


def test_imagefolder_refuses_bad_data(tree, tmp_path):
    with pytest.raises(ValueError, match=r"unknown imagefolder data keys \['pad'\]"):
        _task(tree, {"pad": 1})
    with pytest.raises(ValueError, match="holds 'digits_imagefolder', but the run's dataset"):
        _task(tree, {"dataset": "imagenet"})
    with pytest.raises(ValueError, match="resize=20 must be at least data.crop=32"):
        _task(tree, {"resize": 20})
    with pytest.raises(FileNotFoundError, match="no manifest"):
        _task(tmp_path)


def test_cifar_augmentation_is_a_seeded_padded_crop_and_flip():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) + 5.0  # no pixel equals the black value
    black = torch.full((1, 3, 1, 1), -2.0)
    assert torch.equal(augment(x, black, 0, False, 0, 0, 0), x)
    out = augment(x, black, 1, True, 0, 0, 0)
    assert out.shape == x.shape and torch.equal(out, augment(x, black, 1, True, 0, 0, 0))
    assert not torch.equal(out, augment(x, black, 1, True, 0, 0, 1)), "a new step, new draws"
    for img, src in zip(out, x):  # a shift of at most 1 pixel, black where it left the image
        inner = (img != -2.0).all(dim=0)
        assert inner.sum() >= 7 * 7
        assert any(torch.equal(img[:, inner.any(1)][:, :, inner.any(0)], cand) for cand in
                   [src[:, a:a + int(inner.any(1).sum()), b:b + int(inner.any(0).sum())]
                    .flip(-1) if f else src[:, a:a + int(inner.any(1).sum()),
                                            b:b + int(inner.any(0).sum())]
                    for a in (0, 1) for b in (0, 1) for f in (False, True)])
    # Ranks take slices of one global draw.
    big = torch.randn(8, 3, 8, 8)
    whole = augment(big, black, 1, True, 3, 2, 5)
    for rank in range(2):
        part = augment(big[rank * 4:(rank + 1) * 4], black, 1, True, 3, 2, 5, rank, 2)
        assert torch.equal(part, whole[rank * 4:(rank + 1) * 4])


# --- bad vision params are refused before any job starts -------------------------------------

@pytest.mark.parametrize("data, fragments", [
    ({"resize": 20}, ["vision.runs.imagenet_small_upg.data.resize", "20", "smaller than data.crop 32"]),
    ({"pad": 1}, ["vision.runs.imagenet_small_upg.data", "'pad'"]),
    ({"dataset": "digits"}, ["vision.runs.imagenet_small_upg.data.dataset", "'digits'"]),
    ({"crop": 4}, ["vision.runs.imagenet_small_upg.data.crop", "4"]),
])
def test_bad_imagefolder_data_is_refused_naming_the_key(data, fragments, repo_root):
    import copy

    import yaml

    from pipeline.config import ParamsError, resolve
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = copy.deepcopy(params)
    params["vision"]["runs"]["imagenet_small_upg"]["data"].update(data)
    with pytest.raises(ParamsError) as info:
        resolve(params)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_cifar_augmentation_and_ranks_are_refused(repo_root):
    import yaml

    from pipeline.config import ParamsError, resolve
    for run, key, value in (("cifar10_large_upg", "data", {"crop_padding": -1}),
                            ("cifar10_large_upg", "nproc_per_node", 0),
                            ("cifar10_large_upg", "spectral_batches", -1)):
        params = yaml.safe_load((repo_root / "params.yaml").read_text())
        block = params["vision"]["runs"][run]
        block[key] = {**block[key], **value} if isinstance(value, dict) else value
        with pytest.raises(ParamsError, match=f"vision.runs.{run}.{key}"):
            resolve(params)
