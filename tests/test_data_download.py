"""Data acquisition without the network: a local HTTP server serves a small archive
in the true ``cifar-10-python.tar.gz`` format, and the real code downloads,
verifies, extracts and exports it; ImageNet's validation runs on a tiny tree.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, extract_archive, fetch, load_meta, load_split
from pipeline.data.download import Limits
from pipeline.data.cifar10 import prepare_cifar10
from pipeline.data.imagenet import validate_imagenet

# The CIFAR-format archive and the loopback server (`served`) live in conftest.py, shared
# with the graph datasets' tests.
from conftest import CLASSES, N_TEST, PER_BATCH, md5  # noqa: E402


@pytest.fixture
def closed_url():
    """A URL on a port nothing listens on: the connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def assert_nothing_left(data_root: Path) -> None:
    """No dataset folder, no .part file, no temporary folder."""
    left = sorted(p.name for p in data_root.iterdir()) if data_root.exists() else []
    assert left == [], f"left behind: {left}"


def assert_cifar_layout(out: Path, contents: dict) -> None:
    meta = load_meta(out)
    n_train = 5 * PER_BATCH
    assert meta["name"] == "cifar10" and meta["classes"] == CLASSES and meta["num_classes"] == 10
    assert meta["image_shape"] == [32, 32, 3]
    assert (meta["n_train"], meta["n_test"]) == (n_train, N_TEST)
    for name in ("train.npz", "test.npz"):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    images, labels = load_split(out, "train", verify=True)
    assert tuple(images.shape) == (n_train, 32, 32, 3) and str(images.dtype) == "torch.uint8"
    assert tuple(labels.shape) == (n_train,) and str(labels.dtype) == "torch.int64"
    assert labels.tolist() == contents["train_labels"]
    # b'data' rows are channels-first, row-major: index c * 1024 + row * 32 + col.
    n, row, col, ch = 7, 5, 9, 2
    pixel = contents["train_data"][n, ch * 1024 + row * 32 + col]
    assert int(images[n, row, col, ch]) == int(pixel)
    expected = contents["train_data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(images.numpy(), expected)
    test_images, test_labels = load_split(out, "test")
    assert tuple(test_images.shape) == (N_TEST, 32, 32, 3)
    assert test_labels.tolist() == contents["test_labels"]
    assert int(test_images[1, 0, 31, 0]) == int(contents["test_data"][1, 31])


# --- CIFAR-10 ---------------------------------------------------------------------------


def test_download_verify_extract(served, tmp_path):
    base, _, digest, contents = served
    out = tmp_path / "data" / "cifar10"
    out.mkdir(parents=True)  # as Snakemake leaves it: an empty output folder
    prepare_cifar10(out, url=f"{base}/cifar-10-python.tar.gz", md5=digest)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10"]  # archive and temp gone
    assert_cifar_layout(out, contents)


@pytest.mark.parametrize("served_name, which_md5", [
    ("corrupt.tar.gz", "official"),     # one flipped byte
    ("truncated.tar.gz", "official"),   # checksum catches the short file
    ("truncated.tar.gz", "own"),        # checksum passes, extraction must catch it
])
def test_bad_archive_is_rejected_and_nothing_is_left(served, tmp_path, served_name, which_md5):
    base, root, digest, _ = served
    if which_md5 == "own":
        digest = md5(root / served_name)
    data_root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        prepare_cifar10(data_root / "cifar10", url=f"{base}/{served_name}", md5=digest)
    message = str(err.value)
    expected = "md5 is" if which_md5 == "official" else "truncated or corrupted"
    assert expected in message
    assert "data.cifar10.mirror" in message and "data.cifar10.archive" in message
    assert "dvc pull" in message
    assert_nothing_left(data_root)


def test_connection_closed_early_is_rejected(served, tmp_path):
    base, _, digest, _ = served
    with pytest.raises(DataError, match=r"closed after \d+ of \d+ bytes|IncompleteRead|incomplete"):
        prepare_cifar10(tmp_path / "data" / "cifar10", url=f"{base}/short/cifar-10-python.tar.gz",
                        md5=digest)
    assert_nothing_left(tmp_path / "data")


def test_unreachable_url_gives_a_clear_error(served, tmp_path, closed_url):
    _, _, digest, _ = served
    with pytest.raises(DataError) as err:
        prepare_cifar10(tmp_path / "data" / "cifar10", url=closed_url, md5=digest,
                        limits=Limits(timeout_s=5))
    message = str(err.value)
    assert closed_url in message and "refused" in message.lower()
    assert "set data.cifar10.mirror" in message and "dvc pull" in message
    assert_nothing_left(tmp_path / "data")


def test_mirror_is_tried_after_the_primary_fails(served, tmp_path, closed_url):
    base, _, digest, contents = served
    direct = tmp_path / "direct" / "cifar10"
    prepare_cifar10(direct, url=f"{base}/cifar-10-python.tar.gz", md5=digest)
    # refused, 404, wrong md5
    for primary in (closed_url, f"{base}/missing.tar.gz", f"{base}/corrupt.tar.gz"):
        out = tmp_path / "data" / "cifar10"
        prepare_cifar10(out, url=primary, mirror=f"{base}/cifar-10-python.tar.gz", md5=digest)
        assert_cifar_layout(out, contents)
        # Same bytes whichever route the archive took (meta names the md5, not the URL).
        for name in ("train.npz", "test.npz", "meta.json"):
            assert (out / name).read_bytes() == (direct / name).read_bytes()


def test_local_archive_needs_no_server(served, tmp_path):
    _, root, digest, contents = served
    archive = tmp_path / "copy" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    shutil.copy(root / "cifar-10-python.tar.gz", archive)
    out = tmp_path / "data" / "cifar10"
    prepare_cifar10(out, url="http://127.0.0.1:9/unused", md5=digest, archive=archive)
    assert_cifar_layout(out, contents)
    assert archive.exists()  # a local copy is read, never moved


def test_local_archive_with_wrong_md5_is_rejected(served, tmp_path):
    _, root, _, _ = served
    with pytest.raises(DataError, match="md5 is .* expected"):
        prepare_cifar10(tmp_path / "data" / "cifar10", url="http://127.0.0.1:9/unused",
                        md5="0" * 32, archive=root / "cifar-10-python.tar.gz")
    assert_nothing_left(tmp_path / "data")


def test_failed_refresh_keeps_the_previous_dataset(served, tmp_path, closed_url):
    base, _, digest, contents = served
    out = tmp_path / "data" / "cifar10"
    prepare_cifar10(out, url=f"{base}/cifar-10-python.tar.gz", md5=digest)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError):
        prepare_cifar10(out, url=closed_url, md5=digest)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10"]


# --- the shared download path -------------------------------------------------------------


def test_fetch_verifies_sha256_and_renames_atomically(served, tmp_path):
    base, root, _, _ = served
    blob = (root / "truncated.tar.gz").read_bytes()
    dest = tmp_path / "dl" / "file.bin"
    fetch(f"{base}/truncated.tar.gz", dest, ("sha256", hashlib.sha256(blob).hexdigest()))
    assert dest.read_bytes() == blob
    with pytest.raises(DataError, match="sha256 is"):
        fetch(f"{base}/truncated.tar.gz", tmp_path / "dl2" / "file.bin", ("sha256", "0" * 64))
    assert list((tmp_path / "dl2").iterdir()) == []


def test_extract_archive_replaces_atomically_and_rejects_garbage(tmp_path):
    import zipfile
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/x.txt", "new")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    extract_archive(archive, dest)
    assert [p.relative_to(dest).as_posix() for p in sorted(dest.rglob("*"))] == ["top", "top/x.txt"]
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="cannot extract"):
        extract_archive(tmp_path / "junk.tar.gz", tmp_path / "junk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "junk.tar.gz", "out"]


# --- the command and the Snakemake rule -------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_cli_command(served, tmp_path, closed_url):
    base, _, digest, contents = served
    def command(out, url, *extra):
        return subprocess.run([sys.executable, "-m", "pipeline", "data", "cifar10", "--out", out,
                               "--url", url, "--md5", digest, "--mirror", "", *extra],
                              cwd=tmp_path, capture_output=True, text=True, env=_env())

    ok = command("data/cifar10", f"{base}/cifar-10-python.tar.gz")
    assert ok.returncode == 0, ok.stderr
    assert_cifar_layout(tmp_path / "data" / "cifar10", contents)
    failed = command("elsewhere/cifar10", closed_url, "--timeout", "5")
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: could not download")
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "elsewhere" / "cifar10").exists()


def _data_workflow(folder: Path, repo_root: Path, **cifar10) -> None:
    """A Snakefile with the real common.smk and data.smk, and params.yaml with
    ``data.cifar10`` updated by ``cifar10``."""
    import yaml
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["data"]["cifar10"].update(cifar10)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "Snakefile").write_text(
        'configfile: "params.yaml"\n'
        f'include: "{repo_root}/workflow/rules/common.smk"\n'
        f'include: "{repo_root}/workflow/rules/data.smk"\n')


def test_snakemake_rules(served, tmp_path, repo_root):
    """The real rules (workflow/rules/data.smk) under the real common.smk, against the server."""
    base, _, digest, contents = served
    _data_workflow(tmp_path, repo_root, url=f"{base}/cifar-10-python.tar.gz", md5=digest)
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2",
                          "--workflow-profile", "none", "download_cifar10", "export_digits"],
                         cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert_cifar_layout(tmp_path / "data" / "cifar10", contents)
    assert load_meta(tmp_path / "data" / "digits")["n_train"] == 1437
    for rule in ("download_cifar10", "export_digits"):
        assert (tmp_path / "logs" / f"{rule}.log").exists()
        assert (tmp_path / "benchmarks" / "rules" / f"{rule}.tsv").exists()


# --- ImageNet: a user-provided ImageFolder tree ----------------------------------------


def _image_tree(root: Path, classes=("n01", "n02"), per_class=(3, 2)) -> Path:
    from PIL import Image

    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(folder / f"{name}_{i}.png")
    return root


def test_imagenet_tree_passes_and_manifest_is_written(tmp_path):
    root = _image_tree(tmp_path / "imagenet")
    # Not an image: skipped, as ImageFolder skips it.
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    manifest = tmp_path / "data" / "imagenet" / "manifest.json"
    validate_imagenet(root, manifest)
    written = json.loads(manifest.read_text())
    assert written["classes"] == ["n01", "n02"] and written["num_classes"] == 2
    assert written["counts"] == {"train": {"n01": 3, "n02": 3}, "val": {"n01": 2, "n02": 2}}
    assert (written["n_train"], written["n_val"]) == (6, 4)
    assert written["root"] == str(root.resolve())


@pytest.mark.parametrize("damage, message", [
    ("unset", "data.imagenet.root is not set"),
    ("no_root", "is not a directory"),
    ("no_val", "val: missing"),
    ("empty_class", "n02: no images"),
    ("class_mismatch", "different classes"),
    ("bad_image", "not a readable image"),
])
def test_imagenet_malformed_tree_fails_clearly(tmp_path, damage, message):
    root = _image_tree(tmp_path / "imagenet")
    if damage == "no_root":
        shutil.rmtree(root)
    elif damage == "no_val":
        shutil.rmtree(root / "val")
    elif damage == "empty_class":
        for image in (root / "train" / "n02").iterdir():
            image.unlink()
    elif damage == "class_mismatch":
        shutil.rmtree(root / "val" / "n02")
    elif damage == "bad_image":
        (root / "val" / "n01" / "n01_0.png").write_bytes(b"garbage")
    manifest = tmp_path / "data" / "imagenet" / "manifest.json"
    manifest.parent.mkdir(parents=True)  # as Snakemake leaves it
    with pytest.raises(DataError, match=message) as err:
        validate_imagenet(None if damage == "unset" else root, manifest)
    if damage != "bad_image":  # structural damage: the message says what the tree must look like
        assert "ImageFolder" in str(err.value)
    assert not manifest.parent.exists()


# --- downloads that cannot hang, kills that leave nothing (issue 15) ------------------------

@pytest.mark.parametrize("limits, reason", [
    (Limits(timeout_s=5, deadline_s=1.5, min_rate_bytes_per_s=0), "deadline of 1.5 s passed"),
    (Limits(timeout_s=5, deadline_s=60, min_rate_bytes_per_s=1000, rate_window_s=1.0),
     "below 1000"),
])
def test_a_trickling_server_fails_within_its_limits(served, tmp_path, limits, reason):
    """20 bytes/s: each read returns within the socket timeout, so only the deadline and the
    rate can stop it."""
    base, _, digest, _ = served
    start = time.monotonic()
    with pytest.raises(DataError, match=reason):
        prepare_cifar10(tmp_path / "data" / "cifar10", url=f"{base}/trickle/cifar-10-python.tar.gz",
                        md5=digest, limits=limits)
    assert time.monotonic() - start < min(limits.deadline_s, 3 * limits.rate_window_s) + 1.0
    assert_nothing_left(tmp_path / "data")


def _wait_for(predicate, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def test_sigterm_mid_download_leaves_no_part_file(served, tmp_path):
    """scancel sends SIGTERM: the download's cleanup runs as after any other failure."""
    import signal
    base, _, digest, _ = served
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "data", "cifar10",
                             "--out", str(data / "cifar10"), "--md5", digest,
                             "--url", f"{base}/trickle/cifar-10-python.tar.gz"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(lambda: any(data.rglob("*.part")) if data.exists() else False)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert not data.exists(), sorted(p.name for p in data.rglob("*"))


def test_leftovers_of_a_killed_run_are_removed_on_the_next_start(served, tmp_path):
    """SIGKILL runs no cleanup: the next start removes what it left."""
    _, root, digest, contents = served
    data = tmp_path / "data"
    (data / ".cifar10.x1.tmp").mkdir(parents=True)
    (data / ".cifar10.x1.tmp" / ".cifar-10-python.tar.gz.y.part").write_bytes(b"half")
    (data / ".cifar10.x2.old").mkdir()
    (data / "unrelated.txt").write_text("kept")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "data", "cifar10",
                           "--out", "data/cifar10", "--md5", digest, "--url", "http://unused",
                           "--archive", str(root / "cifar-10-python.tar.gz")],
                          cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "left by an earlier killed run" in proc.stderr
    assert sorted(p.name for p in data.iterdir()) == ["cifar10", "unrelated.txt"]
    assert_cifar_layout(data / "cifar10", contents)


def test_cli_refuses_an_md5_the_schema_refuses(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "data", "cifar10", "--out",
                           "data/cifar10", "--url", "http://unused", "--md5",
                           "C58F30108F718F92721AF3B95E74349A"],
                          cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "is not an md5" in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()


def test_sigint_to_snakemake_ends_a_download_promptly(served, tmp_path, repo_root):
    """Ctrl-C on `snakemake` during a trickling download: it stops within seconds and
    leaves neither a .part file nor a half dataset. A terminal sends SIGINT to the whole
    foreground process group, Snakemake and its jobs (Snakemake itself waits for running
    jobs), so the test does the same, with SIGINT's default action restored (a shell
    ignores it in background commands, and the child would inherit that)."""
    import signal

    base, _, digest, _ = served
    _data_workflow(tmp_path, repo_root, url=f"{base}/trickle/cifar-10-python.tar.gz", md5=digest)
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1",
                             "--workflow-profile", "none", "download_cifar10"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    data = tmp_path / "data"
    _wait_for(lambda: any(data.rglob("*.part")) if data.exists() else False, 60)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - start < 15, out
    assert proc.returncode != 0, out
    left = sorted(str(p.relative_to(tmp_path)) for p in data.rglob("*")) if data.exists() else []
    assert left == [], left


def test_download_limit_defaults_are_the_params_yaml_values(repo_root):
    import dataclasses

    import yaml
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert dataclasses.asdict(Limits()) == params["data"]["download"]
