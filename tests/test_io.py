"""pipeline/io.py: atomic writes leave either the whole new file or nothing."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline.io import atomic_path, read_json, write_csv, write_json


def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_text("half a result")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert list(target.parent.iterdir()) == [], "temporary file left behind"


def test_atomic_path_keeps_the_old_file_when_the_body_raises(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new\n")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with atomic_path(target) as tmp:
        tmp.write_text("new\n")
        assert target.read_text() == "old\n", "target must not change before the body ends"
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_json_round_trip(tmp_path):
    obj = {"Lh": 0.9, "ks": [1, 2, 20], "nested": {"ok": True, "none": None}, "name": "λ"}
    path = tmp_path / "a" / "b" / "summary.json"
    write_json(obj, path)
    assert read_json(path) == obj
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_write_csv_round_trip(tmp_path):
    frame = pd.DataFrame({"estimator": ["upg", "npg"], "k": [1, 20], "lam": [0.5, 1.0],
                          "cos_mean": [0.875428123456789, 0.999861]})
    path = tmp_path / "grid.csv"
    write_csv(frame, path)
    back = pd.read_csv(path)
    pd.testing.assert_frame_equal(back, frame)
    assert path.read_text().splitlines()[0] == "estimator,k,lam,cos_mean", "index written"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.csv"]


def test_what_a_sigkill_leaves_is_named_partial_and_ignored_by_dvc(tmp_path, repo_root, venv_bin):
    """SIGKILL skips atomic_path's clean-up: the half-written temporary stays, but its name
    says so and .dvcignore keeps it out of a versioned results folder."""
    import signal
    import subprocess
    import sys
    import time
    target = tmp_path / "metrics.json"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pipeline.io import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, cwd=repo_root)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    time.sleep(0.1)
    left = [p.name for p in tmp_path.iterdir()]
    assert not target.exists() and len(left) == 1 and ".partial-" in left[0], left
    inside = f"results/ablations/mdeq/{left[0]}"        # where a killed job would leave it
    check = subprocess.run([str(venv_bin / "dvc"), "check-ignore", inside], cwd=repo_root,
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == inside, check
    kept = subprocess.run([str(venv_bin / "dvc"), "check-ignore",
                           "results/ablations/mdeq/metrics.json"],
                          cwd=repo_root, capture_output=True, text=True)
    assert kept.returncode == 1, "the finished file itself must stay versioned"
