"""Record the refactor baseline on this machine's CPU, for
``tests/test_train.py::test_the_shared_loop_reproduces_the_mdeq_tiny_loop``:

    .venv/bin/python tests/data/record_refactor_baseline.py

It checks out commit 4ac527b (the MDEQ-Tiny loop before the shared loop) in a temporary git
worktree, runs its ``python -m pipeline train`` on the digits (test_fraction 0.2, seed 0),
one thread, for the three ablations of ``refactor_baseline.json`` (its ``overrides`` merged
into that commit's params.yaml), and stores their per-step losses and accuracies under this
CPU (model name and torch's kernel set) in ``platforms``.

Why per CPU: float32 training rounds differently on another CPU model or kernel set (AVX2,
AVX512), and a few Broyden solves and optimizer steps grow that into differences far above
the test's tolerance (0.3 % by step 2 between the two CPUs recorded). The old and the new
loop are compared on the same CPU, as they were when the loop was rewritten.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from pipeline.environment import cpu
from pipeline.io import write_json

BASELINE = Path(__file__).with_name("refactor_baseline.json")
REPO = Path(__file__).resolve().parents[2]


def record_old_loop(base: dict, work: Path) -> dict:
    """The three runs of the old loop, checked out at ``base["commit"]`` under ``work``."""
    tree = work / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                    base["commit"]], check=True, capture_output=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        ablations = yaml.safe_load((tree / "params.yaml").read_text())["ablations"]
        data = work / "digits"
        subprocess.run([sys.executable, "-c", "import sys; from pipeline.data.digits import "
                        f"export_digits; export_digits(sys.argv[1], 0.2, 0)", str(data)],
                       check=True, cwd=tree, env=env)
        runs = {}
        for name in base["runs"]:
            params = {**ablations["defaults"], **ablations["runs"][name], **base["overrides"]}
            out = work / name
            subprocess.run([sys.executable, "-m", "pipeline", "train", "--name", name,
                            "--params", json.dumps(params), "--data", str(data), "--out", str(out),
                            "--checkpoints", str(work / "ck"), "--tracking-uri", "none",
                            "--artifacts", str(work / "artifacts"), "--threads", "1"],
                           check=True, cwd=tree, env=env)
            curves = pd.read_csv(out / "curves.csv")
            history = json.loads((out / "metrics.json").read_text())["history"]
            runs[name] = {"loss": curves["loss"].tolist(), "train_acc": curves["train_acc"].tolist(),
                          "test_acc": [h["test_acc"] for h in history]}
        return runs
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       check=True, capture_output=True)


def main() -> int:
    base = json.loads(BASELINE.read_text())
    platform = cpu()
    with tempfile.TemporaryDirectory() as tmp:
        runs = record_old_loop(base, Path(tmp))
    kept = [p for p in base["platforms"]
            if (p["cpu"], p["cpu_capability"]) != (platform["cpu"], platform["cpu_capability"])]
    base["platforms"] = [*kept, {**platform, "runs": runs}]
    write_json(base, BASELINE)
    print(f"{BASELINE}: recorded on {platform['cpu']} ({platform['cpu_capability']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
