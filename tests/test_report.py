"""The report: paper vs ours from results/ only, and Snakemake's self-contained report,
on the tiny end-to-end run (the `workflow` fixture of conftest.py)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import snakemake
from pipeline.figures.report import STATUSES, reference

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(workflow, venv_bin) -> dict:
    proc = snakemake(workflow, venv_bin, "--report", "report.html", "--configfile", "tiny.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (workflow / "report.html").read_text()
    blob = re.search(r"var results = (\{.*?\});\n", html, re.S).group(1)
    return json.loads(blob)


def _value(path: Path, where: str):
    if path.suffix == ".json":
        node = json.loads(path.read_text())
        for part in where.split("."):
            node = node[part]
        return node
    return pd.read_csv(path)[where].dropna().tolist()


def test_every_ours_cell_is_read_from_its_source(workflow):
    table = pd.read_csv(workflow / "figures/report/paper_vs_ours.csv", keep_default_na=False)
    entries = {e["id"]: e for e in reference()["claims"]}
    assert set(table["id"]) == set(entries)
    checked = 0
    for row in table.itertuples():
        assert row.status in STATUSES, row
        if row.ours == "not run":
            assert row.status == "not run at this scale"
            continue
        specs = entries[row.id].get("values") or {"ours": entries[row.id]["ours"]}
        for (name, spec), source in zip(specs.items(), row.source.split("; ")):
            rel, where = source.split("#")
            paths = sorted(workflow.glob(rel))  # a pattern (agg over runs, e.g. seeds) or a file
            assert paths and where == spec.get("key", spec.get("column")), source
            raws = [_value(path, where) for path in paths]
            raw = raws[0] if len(raws) == 1 else \
                {"mean": lambda x: sum(x) / len(x), "max": max, "min": min}[spec["agg"]](raws)
            if isinstance(raw, list):  # a CSV column: its aggregate
                raw = {"max": max, "min": min}[spec["agg"]](raw)
            if isinstance(raw, (int, float)):
                raw = 100 * raw if spec.get("scale_pct") else raw
                raw = f"{raw:.4g}" if isinstance(raw, float) and not math.isnan(raw) else str(raw)
            ours = re.sub(r"^smoke value at [^:]*: ", "", row.ours)  # a claim judged elsewhere
            shown = ours if len(specs) == 1 else dict(
                part.split(" ", 1) for part in ours.split(", "))[name]
            assert shown == str(raw), (row.id, name, shown, raw)
            checked += 1
    assert checked >= 4, "the tiny run should fill some ours cells"


def test_default_scale_statuses(workflow):
    table = pd.read_csv(workflow / "figures/report/paper_vs_ours.csv", keep_default_na=False)
    status = dict(zip(table["id"], table["status"]))
    # quantitative claims are comparable only at paper scale, on the paper's data
    assert status["cifar10_large_upg"] == "not run at this scale"
    assert status["ablation_acc_mdeq"] == "paper value not available"
    # the verdicts at any scale follow their rule on the tiny run's own values
    speedup = json.loads((workflow / "results/ablations/upg_sgd/metrics.json").read_text())[
        "diagnostics"]["median_grad_speedup_vs_implicit"]
    assert status["upg_backward_faster"] == ("reproduced" if speedup > 1 else "not reproduced")
    # claims about trained models at the paper's scale are not judged on a default run
    for claim in ("rho_lambda_near_one", "npg_rho_grows_upg_bounded",
                  "npg_fails_postln_without_jr", "test_time_unrolling_cifar10",
                  "test_time_unrolling_imagenet", "backward_speedup_fixed_budget",
                  "backward_speedup_tolerance", "wt103_upg_jr_f14"):
        assert status[claim] == "not run at this scale", (claim, status[claim])
    note = dict(zip(table["id"], table["note"]))
    assert "needs at least 2 runs" in note["npg_rho_grows_upg_bounded"]
    smoke = dict(zip(table["id"], table["ours"]))["rho_lambda_near_one"]
    assert smoke.startswith("smoke value at default / digits_imagefolder: rho "), smoke
    tt = json.loads((workflow / "results/ablations/upg_sgd/metrics.json").read_text())["test_time"]
    held = tt["decay_without_unrolling"] <= tt["two_se"] and tt["gain_from_2k"] <= tt["two_se"]
    assert status["test_time_unrolling_digits"] == ("reproduced" if held else "not reproduced")
    md = (workflow / "figures/report/paper_vs_ours.md").read_text()
    assert "pipeline scale: default" in md and "default scale, one seed per run" in md
    dev = (workflow / "figures/report/deviations.md").read_text()
    assert "digits" in dev
    times = pd.read_csv(workflow / "figures/report/runtime.csv")
    row = times.set_index("study").loc["ablations"]
    assert row["jobs"] == len(yaml.safe_load((workflow / "params.yaml").read_text())
                              ["ablations"]["runs"]) + 2  # + tiny's exploding run + report
    for study in ("synthetic", "ablations", "graph"):  # time in MLflow calls, a share of the wall
        tracked = times.set_index("study").loc[study]
        assert tracked["tracking_s"] > 0 and 0 < tracked["tracking_over_wall"] < 1, tracked
    memory = {name: json.loads((workflow / f"results/ablations/{name}/metrics.json").read_text())
              ["peak_memory_mb"] for name in ("npg_sgd", "upg_sgd")}
    assert status["npg_memory_below_upg"] == (
        "reproduced" if memory["npg_sgd"] < memory["upg_sgd"] else "not reproduced")
    for claim in ("broyden_converges_at_0.9", "grid_cosine_rises_with_k"):  # its condition
        assert "under u ~ N(0, 0.01²)" in note[claim], note[claim]


def test_every_figure_is_in_the_report_with_a_full_caption(workflow, report):
    figures = sorted(str(p.relative_to(workflow)) for p in (workflow / "figures").rglob("*")
                     if p.suffix in (".png", ".md"))
    assert figures and set(figures) <= set(report), set(figures) - set(report)
    commit = re.compile(r"[0-9a-f]{40}(-dirty)?|unknown")
    for name in figures:
        caption = report[name]["caption"]
        assert "Scale:" in caption and "default" in caption, (name, caption)
        assert "Dataset:" in caption and "MLflow run ids:" in caption, (name, caption)
        ids = re.search(r"MLflow run ids:</strong> (.*?)</li>", caption).group(1)
        assert re.search(r"[0-9a-f]{32}", ids), (name, ids)
        assert commit.search(re.search(r"Commit:</strong> (.*?)</li>", caption).group(1))


def test_deleting_the_table_plans_only_its_rule(workflow, venv_bin):
    (workflow / "figures/report/paper_vs_ours.md").unlink()
    proc = snakemake(workflow, venv_bin, "-n", "figures", "--configfile", "tiny.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from test_workflow_e2e import planned
    assert planned(proc) == {"paper_vs_ours": 1, "figures": 1}, proc.stdout[-2000:]
    proc = snakemake(workflow, venv_bin, "figures", "--configfile", "tiny.yaml")
    assert proc.returncode == 0 and (workflow / "figures/report/paper_vs_ours.md").exists()


def test_dvc_lists_each_study_summary_metrics(workflow, repo_root, venv_bin):
    """`dvc metrics show` in the tiny run's folder, with this repository's dvc.yaml."""
    import shutil
    import subprocess
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(repo_root / name, workflow / name)
    import os
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = lambda *cmd: subprocess.run(cmd, cwd=workflow, capture_output=True, text=True,
                                      env=env)
    assert run("git", "init", "-q").returncode == 0
    assert run("dvc", "init", "-q").returncode == 0
    proc = run("dvc", "metrics", "show", "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.dumps(json.loads(proc.stdout))
    for name, values in json.loads(
            (workflow / "figures/ablations/ablations_metrics.json").read_text()).items():
        assert name in shown and values["status"] in shown


def test_paper_values_live_in_the_reference_file_only(repo_root):
    """No figure module types a paper number: the tables read them from reference.yaml."""
    from pipeline.figures.report import reference
    numbers = {f"{e['paper']:g}" for e in reference()["claims"]
               if isinstance(e["paper"], float) and e["paper"] > 1}
    assert {"1.7", "77.7", "97.6"} <= numbers
    for path in (repo_root / "pipeline/figures").glob("*.py"):
        text = path.read_text()
        assert not [n for n in numbers if re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", text)], path
