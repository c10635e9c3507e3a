"""The MLflow UI in a real browser, on the store the tiny end-to-end run filled: the runs
list and a compare view of two ablation runs (headless Chromium, Debian's `chromium`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.tracking import job_runs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium on PATH: `apt-get install -y chromium` (.ci/run does) to run the "
                "MLflow UI browser test", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(workflow, venv_bin):
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([str(venv_bin / "mlflow"), "server", "--backend-store-uri",
                             "sqlite:///mlruns/mlflow.db", "--workers", "1", "--host",
                             "127.0.0.1", "--port", str(port)], cwd=workflow, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def chromium(url: str, *mode: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--virtual-time-budget=20000",
           "--window-size=1400,1000", *mode, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def test_runs_list_and_compare_view(workflow, server):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{workflow}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("ablations")
    runs = {r.info.run_name: r.info.run_id for r in job_runs(client, exp.experiment_id)}

    listing = chromium(f"{server}/#/experiments/{exp.experiment_id}"
                       "?workflowType=machine_learning", "--dump-dom")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", listing))
    assert "ablations (default)" in text, "the parent run heads the runs list"
    shown = re.search(r"(\d+) matching runs", text)
    assert shown and int(shown.group(1)) == len(runs) + 1, text[-1500:]  # + the default parent
    assert "ablations (paper)" not in text, "a default run makes no paper-scale parent"
    # the runs list folds the jobs under their study's parent, whose Dataset cell names
    # the datasets its jobs logged (tracking.Run.log_dataset logs them on the parent too)
    assert re.search(r" Dataset .* ablations \(default\) .*digits", text), text[-3000:]

    # a job's own input, on its run page: name (digest) and context
    upg = client.get_run(runs["upg_sgd"])
    digest = upg.inputs.dataset_inputs[0].dataset.digest
    page = chromium(f"{server}/#/experiments/{exp.experiment_id}/runs/{runs['upg_sgd']}",
                    "--dump-dom")
    page = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert f"Datasets digits ({digest}) train+test" in page, page[:3000]

    pair = [runs["upg_sgd"], runs["npg_sgd"]]
    url = (f"{server}/#/compare-runs?runs={json.dumps(pair, separators=(',', ':'))}"
           f"&experiments={json.dumps([exp.experiment_id])}")
    compare = chromium(url, "--dump-dom")
    for text in ("Comparing 2 Runs", "upg_sgd", "npg_sgd", "grad/cos_sim", *pair):
        assert text in compare, text
    shot = workflow / "mlflow_compare.png"
    chromium(url, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000, "a blank screenshot"
