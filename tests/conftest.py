"""Shared fixtures: where the repository and its virtual environment live, the end-to-end
run of the DAG that several test files read (``workflow``), and a loopback HTTP server for
the download tests (``served``: a CIFAR-format archive; ``serve_folder``: any folder, as
the graph datasets' tests use).

The suite runs on pytest-xdist's workers (``-n auto`` in pyproject.toml): each worker uses
one torch thread (and its subprocesses one OpenMP / MKL thread); tests go to a worker file
by file, and the files that read ``workflow`` together, after the DAG has run once for the
whole session under a file lock.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: workers share the cores
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    import torch
    torch.set_num_threads(1)


# The test files that read the end-to-end run (the ``workflow`` fixture). Under xdist they
# are one scope, on one worker, scheduled first: the DAG is the suite's longest chain.
WORKFLOW_FILES = ("test_workflow_e2e.py", "test_report.py", "test_dvc.py", "test_mlflow_ui.py")

# The longest of the other files, longest first (seconds on one worker beside the DAG, 2-core
# VM, 2026-12-06: 98, 95, 57, 51, 48, 24, 23, 23): scheduled right after the workflow's scope,
# so the other worker starts on them and the short files fill the end; in collection order
# (alphabetical) test_train.py came last and ran 77 s after the other worker had finished.
LONG_FILES = ("test_train.py", "test_ddp.py", "test_gpu_script.py", "test_benchmarks.py",
              "test_synthetic.py", "test_config.py", "test_data_wikitext.py", "test_tracking.py")


def _file_order(name: str) -> int:
    """The workflow's files first, then LONG_FILES in their order, then the rest."""
    if name in WORKFLOW_FILES:
        return 0
    return 1 + LONG_FILES.index(name) if name in LONG_FILES else 1 + len(LONG_FILES)


def pytest_collection_modifyitems(config, items):
    """The tests of WORKFLOW_FILES first, then those of LONG_FILES; a test elsewhere that
    reads ``workflow`` is refused, since the scheduler would not keep it on the workflow's
    worker."""
    stray = [item.nodeid for item in items if "workflow" in getattr(item, "fixturenames", ())
             and item.path.name not in WORKFLOW_FILES]
    if stray:
        raise pytest.UsageError(f"{stray[0]} reads the `workflow` fixture: add its file to "
                                "WORKFLOW_FILES in tests/conftest.py")
    items.sort(key=lambda item: _file_order(item.path.name))  # stable: a file's tests in order


@pytest.hookimpl(optionalhook=True)  # a run without xdist (-p no:xdist) never calls it
def pytest_xdist_make_scheduler(config, log):
    """xdist's ``loadfile`` (a file's tests on one worker, so its module fixtures, such as a
    benchmark run, are made once), with every file of WORKFLOW_FILES in one scope: no two
    of them run Snakemake in the workflow's folder at once, and no worker waits on another's
    DAG. (``--dist loadgroup`` would do it with markers, but pytest 9.2 ignores the node ids
    xdist 3.8 rewrites for it.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling
    config.option.loadscopereorder = False  # collection order: the workflow's scope first

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "workflow" if Path(path).name in WORKFLOW_FILES else path

    return FileScheduling(config, log)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds params.yaml, Snakefile, pipeline/)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The bin/ folder of the interpreter running the tests (.venv/bin here): python, snakemake."""
    return Path(sys.executable).parent


def snakemake(workdir: Path, venv_bin: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(venv_bin / "snakemake"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)


@pytest.fixture(scope="session")
def workflow(tmp_path_factory, repo_root: Path, venv_bin: Path, worker_id: str) -> Path:
    """A copy of the workflow after `snakemake --cores 2 figures --configfile tiny.yaml`
    (tests/configs/tiny.yaml): the end-to-end run the e2e, report, DVC and MLflow UI tests
    read. Its Snakemake output is in snakemake.out. It runs once per session: under xdist
    the workers share the folder, and a file lock makes the first one build it."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # the session's folder, above each worker's own
    work = shared / "workflow"
    with FileLock(str(shared / "workflow.lock")):
        if not (work / "snakemake.out").is_file():
            shutil.rmtree(work, ignore_errors=True)  # what a failed attempt left
            work.mkdir()
            for name in ("Snakefile", "params.yaml"):
                shutil.copy(repo_root / name, work / name)
            for name in ("workflow", "profiles", "envs"):
                shutil.copytree(repo_root / name, work / name)
            shutil.copy(repo_root / "tests" / "configs" / "tiny.yaml", work / "tiny.yaml")
            proc = snakemake(work, venv_bin, "figures", "--configfile", "tiny.yaml")
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
            (work / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return work


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema made (the migrations take about a second
    and a half), once per worker."""
    from mlflow.tracking import MlflowClient
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store_uri(tmp_path, _store_template) -> str:
    """A fresh, empty MLflow store for one test (``sqlite:///<tmp_path>/mlflow.db``): a copy
    of the worker's template, so the schema is not migrated again in every test."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(_store_template, path)
    return f"sqlite:///{path}"


# --- loopback downloads ----------------------------------------------------------------------

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]
PER_BATCH, N_TEST = 3, 4


def _batch(label: bytes, data: np.ndarray, labels: list[int]) -> bytes:
    # The official batches are Python 2 pickles of dicts whose keys come back as
    # bytes; protocol 2 with bytes keys reproduces what pickle.load(encoding="bytes") sees.
    return pickle.dumps({b"batch_label": label, b"labels": labels, b"data": data,
                         b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]},
                        protocol=2)


def make_cifar_archive(path: Path) -> dict:
    """Write a small archive in the official layout; return the arrays it holds."""
    rng = np.random.default_rng(0)
    members, train_data, train_labels = {}, [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=PER_BATCH)]
        members[f"data_batch_{i}"] = _batch(f"training batch {i} of 5".encode(), data, labels)
        train_data.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, size=(N_TEST, 3072), dtype=np.uint8)
    test_labels = [int(x) for x in rng.integers(0, 10, size=N_TEST)]
    members["test_batch"] = _batch(b"testing batch 1 of 1", test_data, test_labels)
    members["batches.meta"] = pickle.dumps(
        {b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CLASSES],
         b"num_vis": 3072}, protocol=2)
    members["readme.html"] = b"<html></html>"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {"train_data": np.concatenate(train_data), "train_labels": train_labels,
            "test_data": test_data, "test_labels": test_labels}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus /short/<name>: announces the full length, sends half, hangs up;
    /trickle/<name>: announces the full length, then sends one byte every 50 ms."""

    def do_GET(self):
        if self.path.startswith("/trickle/"):
            blob = Path(self.directory, self.path.removeprefix("/trickle/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            try:
                for i in range(min(len(blob), 600)):  # 30 s at most, then hang up
                    self.wfile.write(blob[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:  # the client gave up: what the tests expect
                pass
            self.close_connection = True
            return
        if self.path.startswith("/short/"):
            blob = Path(self.directory, self.path.removeprefix("/short/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob[: len(blob) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean
        pass


@contextmanager
def serve_folder(root: Path):
    """Serve ``root`` on 127.0.0.1 (plus /short/ and /trickle/); yields the base URL."""
    handler = partial(_Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, served folder, archive md5, archive contents)."""
    root = tmp_path_factory.mktemp("www")
    contents = make_cifar_archive(root / "cifar-10-python.tar.gz")
    blob = (root / "cifar-10-python.tar.gz").read_bytes()
    (root / "corrupt.tar.gz").write_bytes(blob[:100] + bytes([blob[100] ^ 0xFF]) + blob[101:])
    (root / "truncated.tar.gz").write_bytes(blob[: len(blob) // 2])
    with serve_folder(root) as base:
        yield base, root, md5(root / "cifar-10-python.tar.gz"), contents
