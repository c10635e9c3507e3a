"""Every verdict of the paper-vs-ours report can come out either way.

For every claim of ``pipeline/figures/reference.yaml`` the file holds a ``flip`` pair: the
contents of its results files on each side of its threshold. This test writes each side
as results files (where the claim reads them, at the scale and on the dataset where the
claim is judged), evaluates the claim as the report does, and asserts that the status is
"reproduced" on one side and "not reproduced" on the other. A claim without a pair fails
the test, unless it has no paper value to compare with (the one list below).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.figures.report import evaluate, reference

# Quantitative claims whose paper value could not be read: always "paper value not available".
NO_PAPER_VALUE = {"ablation_acc_mdeq", "ablation_acc_upg_sgd", "ablation_acc_npg_sgd",
                  "proteins_ignn_upg", "mutag_ignn_upg"}

CLAIMS = reference()["claims"]


def _meta(comparable: dict) -> dict:
    return {"scale": "default" if comparable["scale"] == "any" else comparable["scale"],
            "dataset": "digits" if comparable["dataset"] == "any" else comparable["dataset"],
            "status": "finished"}


def _set(node: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def write_side(results: Path, entry: dict, side: dict) -> None:
    """The results files one side of a flip pair describes."""
    specs = entry.get("values") or {"ours": entry["ours"]}
    meta = _meta(entry["comparable"])
    for name, spec in specs.items():
        content = side[name]
        contents = content if isinstance(content, list) and "*" in spec["path"] else [content]
        for i, one in enumerate(contents):
            path = results / spec["path"].removeprefix("results/").replace("*", f"_seed{i}")
            path.parent.mkdir(parents=True, exist_ok=True)
            if "key" in spec:
                data = json.loads(path.read_text()) if path.exists() else dict(meta)
                _set(data, spec["key"], one)
                path.write_text(json.dumps(data))
                continue
            columns = one if isinstance(one, dict) else {spec["column"]: [one]}
            rows = len(next(iter(columns.values())))
            frame = pd.DataFrame({**{c: [v] * rows for c, v in spec.get("where", {}).items()},
                                  **columns})
            frame.to_csv(path, index=False)
            (path.parent / "summary.json").write_text(json.dumps(meta))


def test_every_claim_has_a_flip_pair_or_no_paper_value():
    missing = [e["id"] for e in CLAIMS if "flip" not in e and e["id"] not in NO_PAPER_VALUE]
    assert not missing, f"claims without a flip pair in reference.yaml: {missing}"
    for cid in NO_PAPER_VALUE:  # the exemption is for what it says, nothing else
        entry = next(e for e in CLAIMS if e["id"] == cid)
        assert entry["paper"] is None and entry["kind"] == "quantitative", cid


@pytest.mark.parametrize("entry", [e for e in CLAIMS if "flip" in e], ids=lambda e: e["id"])
def test_the_verdict_flips(entry, tmp_path):
    statuses = {}
    for side in ("reproduced", "not_reproduced"):
        results = tmp_path / side / "results"
        write_side(results, entry, entry["flip"][side])
        statuses[side] = evaluate(entry, results, "paper")["status"]
    assert statuses == {"reproduced": "reproduced", "not_reproduced": "not reproduced"}, statuses


@pytest.mark.parametrize("entry", [e for e in CLAIMS if "flip" in e
                                   and e["comparable"]["scale"] != "any"], ids=lambda e: e["id"])
def test_a_claim_about_the_paper_scale_is_not_judged_on_a_default_run(entry, tmp_path):
    """The same values from a default-scale run: "not run at this scale", shown as a smoke
    value, whichever side they are on."""
    results = tmp_path / "results"
    write_side(results, entry, entry["flip"]["reproduced"])
    for path in results.rglob("*.json"):
        data = json.loads(path.read_text())
        if "scale" in data:
            data.update(scale="default", dataset="digits")
            path.write_text(json.dumps(data))
    row = evaluate(entry, results, "default")
    assert row["status"] == "not run at this scale", row
    assert row["ours"].startswith("smoke value at default / digits"), row
