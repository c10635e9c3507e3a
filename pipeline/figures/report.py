"""Paper vs ours: one table from ``reference.yaml`` and ``results/`` (no torch, seconds).

* ``paper_vs_ours.csv`` / ``.md`` / ``.html``: per claim, the paper's value, ours (read
  from the results, never typed in), the scale and dataset ours came from, the gap, a
  status, and the source (``results/...#key``);
* ``deviations.md``: what our runs do differently, from ``reference.yaml``;
* ``runtime.csv`` / ``.md``: job-seconds per study from ``benchmarks/rules/`` against
  each study's budget and the 15-minute default run.

    python -m pipeline report --results results --benchmarks benchmarks/rules \
        --out figures/report --scale default
"""
from __future__ import annotations

import fnmatch
import json
import math
import operator
import re
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from pipeline.figures.common import write_caption
from pipeline.io import atomic_path, write_csv

STATUSES = ("reproduced", "not reproduced", "run failed", "not run at this scale",
            "paper value not available")
DEFAULT_RUN_BUDGET_S = 15 * 60
# Budgets in job-seconds (the `s` column of benchmarks/rules/, times the job's threads) at
# the default scale: 180 for each large-scale study (their issues); ours for the others.
# results: the files under results/ whose `tracking_s` (seconds in MLflow store calls) the
# run-time table sets against the study's job wall time.
STUDIES = {
    "data": {"rules": ["export_digits", "export_mutag", "export_chains", "export_wiki_excerpt",
                       "download_*", "validate_*"], "budget_s": 30},
    "tracking": {"rules": ["init_tracking"], "budget_s": 15},
    "synthetic": {"rules": ["synthetic_study", "plot_synthetic"], "budget_s": 360,
                  "results": ["synthetic/*/summary.json"]},
    "ablations": {"rules": ["train_ablation", "report_ablations"], "budget_s": 360,
                  "results": ["ablations/*/metrics.json"]},
    "vision": {"rules": ["train_vision", "report_vision", "export_digits_imagefolder"],
               "budget_s": 180, "results": ["vision/*/metrics.json"]},
    "lm": {"rules": ["train_lm", "report_lm"], "budget_s": 180, "results": ["lm/*/metrics.json"]},
    "graph": {"rules": ["train_graph", "train_node", "report_graph"], "budget_s": 180,
              "results": ["graph/*/metrics.json", "node/*/metrics.json"]},
    "report": {"rules": ["paper_vs_ours"], "budget_s": 30},
}
OPS = {">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le,
       "==": operator.eq, "!=": operator.ne}


class ReferenceError(ValueError):
    """reference.yaml is malformed; the message names the entry."""


def reference() -> dict:
    return yaml.safe_load(resources.files("pipeline.figures").joinpath("reference.yaml")
                          .read_text())


def paper_text(path: str, key: str | None = None, default: str = "") -> str:
    """How the paper states the value that reference.yaml compares with ours at
    ``path``#``key`` (any key if None), for a study's table to show beside ours; "not
    available" for a null paper value, ``default`` where no claim reads that value."""
    for entry in reference()["claims"]:
        ours = entry.get("ours") or {}
        if ours.get("path") and fnmatch.fnmatch(path, ours["path"]) \
                and key in (None, ours.get("key")):
            return entry["paper_text"] if entry["paper"] is not None else "not available"
    return default


def paper_values(study: str) -> str:
    """The paper values reference.yaml holds for one study, as one line for a table's note."""
    return "; ".join(f"{e['claim']}: {e['paper_text']}" for e in reference()["claims"]
                     if e["study"] == study and e["paper"] is not None)


# --- ours, read from results/ ----------------------------------------------------------------

def _dig(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def _meta(path: Path) -> dict:
    """The JSON beside a results file that says how it was made (metrics.json or
    summary.json), or {}."""
    for name in ("metrics.json", "summary.json"):
        candidate = path.parent / name
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def _unit_failures(meta: dict) -> str | None:
    """"k of N units failed" for a job of folds or seeds (train-repeats) with a failed unit."""
    units = meta.get("units") or []
    failed = [u for u in units if u.get("status") == "failed"]
    return f"{len(failed)} of {len(units)} units failed" if failed else None


def _trend(values: list[float]) -> float:
    """Mean of the last third of a curve minus the mean of its first third (NaN below 2
    points)."""
    if len(values) < 2:
        return math.nan
    third = max(1, len(values) // 3)
    return sum(values[-third:]) / third - sum(values[:third]) / third


def read_ours(spec: dict, root: Path) -> dict:
    """One value from results: {value, files, source, scale, dataset, failed, run_ids,
    commits, short}; value None when no file matches (or, with ``min_files``, fewer files
    than that: ``short`` says so).

    A spec reads a JSON ``key`` (dotted) or a CSV ``column``; for a CSV, ``where`` keeps the
    rows whose columns equal the given strings and ``settled`` the rows where that column
    is 1. ``agg`` combines the matched files and rows: one, mean, max, min, or
    trend_min / trend_max (per file, the mean of the last third of the rows minus the mean
    of the first third; then the smallest or largest over the files)."""
    files = sorted(root.glob(spec["path"].removeprefix("results/")))
    where = spec.get("key") or spec.get("column")
    source = f"{spec['path']}#{where}"
    if not files:
        return {"value": None, "files": [], "source": source}
    if len(files) < spec.get("min_files", 1):
        return {"value": None, "files": [str(f) for f in files], "source": source,
                "short": f"needs at least {spec['min_files']} runs matching {spec['path']}, "
                         f"found {len(files)}"}
    agg = spec.get("agg", "one")
    values, metas = [], [_meta(f) for f in files]
    for f in files:
        if "key" in spec:
            try:
                values.append(_dig(json.loads(f.read_text()), spec["key"]))
            except KeyError:  # a run that did not measure it (e.g. test_time_eval off)
                return {"value": None, "files": [str(f) for f in files], "source": source,
                        "short": f"{f.name} of {f.parent.name} has no {spec['key']}"}
            continue
        frame = pd.read_csv(f, dtype={c: str for c in spec.get("where", {})})
        for col, wanted in spec.get("where", {}).items():
            frame = frame[frame[col] == str(wanted)]
        if spec.get("settled"):
            frame = frame[frame[spec["settled"]] == 1]
        column = frame[spec["column"]].dropna().tolist()
        values.extend([_trend(column)] if agg.startswith("trend") else column)
    if agg.startswith("trend"):
        values = [v for v in values if not math.isnan(v)]
    if not values:
        value = None
    elif all(isinstance(v, str) for v in values):
        value = values[0] if len(set(values)) == 1 else ",".join(map(str, values))
    elif agg == "one":
        if len(values) != 1:
            raise ReferenceError(f"{source}: {len(values)} values and agg 'one'")
        value = values[0]
    else:
        numbers = [float(v) for v in values if v is not None]
        value = {"mean": lambda x: sum(x) / len(x), "max": max, "min": min, "trend_max": max,
                 "trend_min": min}[agg](numbers) if numbers else None
    if spec.get("scale_pct") and isinstance(value, (int, float)):
        value = 100 * value
    failed = [m.get("name", str(f)) for m, f in zip(metas, files) if m.get("status") == "failed"]
    failed += [f"{m.get('name', str(f))}: {_unit_failures(m)}" for m, f in zip(metas, files)
               if m.get("status") != "failed" and _unit_failures(m)]
    return {"value": value, "files": [str(f) for f in files], "source": source,
            "scale": ",".join(sorted({str(m.get("scale", "?")) for m in metas})),
            "dataset": ",".join(sorted({str(m.get("dataset", "?")) for m in metas})),
            "failed": failed,
            "run_ids": sorted({m.get("mlflow_run_id") or m.get("mlflow_parent_run_id")
                               for m in metas
                               if m.get("mlflow_run_id") or m.get("mlflow_parent_run_id")}),
            "commits": sorted({m["git_commit"] for m in metas if m.get("git_commit")})}


# --- one claim -------------------------------------------------------------------------------

def _expect(expr, values: dict) -> bool:
    """``expect``: one condition or a list of them, all of which must hold. A condition is
    ``<name> <op> <name|number>``, or ``|<name> - <number>| <op> <number>`` for "≈"."""
    if isinstance(expr, list):
        return all(_expect(e, values) for e in expr)
    near = re.fullmatch(r"\s*\|\s*(\w+)\s*-\s*([\w.+-]+)\s*\|\s*(<=|<)\s*([\w.+-]+)\s*", expr)
    if near:
        name, centre, op, width = near.groups()
        return OPS[op](abs(values[name] - float(centre)), float(width))
    match = re.fullmatch(r"\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*([\w.+-]+)\s*", expr)
    if not match:
        raise ReferenceError(f"expect {expr!r}: write '<name> <op> <name|number>' or "
                             f"'|<name> - <number>| <= <number>'")
    left, op, right = match.groups()
    a = values[left]
    b = values[right] if right in values else right
    if isinstance(a, (int, float)) and not isinstance(b, (int, float)):
        b = float(b)
    return OPS[op](a, b)


def evaluate(entry: dict, root: Path, scale: str) -> dict:
    """The row of one claim.

    A claim is judged only where it means something: at ``comparable.scale`` on
    ``comparable.dataset`` (``any`` for a claim about the method itself, checkable on any
    run). Elsewhere the row reads "not run at this scale", and a value that exists shows as
    a smoke value, labelled, not as evidence. A row whose runs failed (a job, or one of its
    folds or seeds) reads "run failed", unless the claim ``expects_failure``. ``condition``
    (the choices a reproduced row rests on) goes into the note."""
    specs = entry.get("values") or {"ours": entry["ours"]}
    read = {name: read_ours(spec, root) for name, spec in specs.items()}
    first = next(iter(read.values()))
    values = {name: r["value"] for name, r in read.items()}
    if entry.get("quantity"):  # "<name> / <name>": a ratio of two values is ours
        num, den = (part.strip() for part in entry["quantity"].split("/"))
        if values[num] is not None and values[den] is not None:
            values = {"ours": values[num] / values[den], **values}
    comparable = entry["comparable"]
    row = {"id": entry["id"], "study": entry["study"], "kind": entry["kind"],
           "claim": entry["claim"], "paper": entry.get("paper_text", entry["paper"]),
           "ours": _fmt(values) if len(values) > 1 else _fmt(values.get("ours")),
           "scale": first.get("scale", ""), "dataset": first.get("dataset", ""),
           "comparable_at": f"{comparable['scale']} / {comparable['dataset']}",
           "gap": "", "source": "; ".join(r["source"] for r in read.values()),
           "run_ids": ",".join(i for r in read.values() for i in r.get("run_ids", [])),
           "commits": ",".join(sorted({c for r in read.values() for c in r.get("commits", [])}))}
    notes = []
    failed = [n for r in read.values() for n in r.get("failed", [])]
    missing = any(r["value"] is None for r in read.values())
    at_scale = all(comparable["scale"] in ("any", r.get("scale")) and
                   comparable["dataset"] in ("any", r.get("dataset"))
                   for r in read.values() if r["value"] is not None)
    short = [r["short"] for r in read.values() if r.get("short")]
    if missing:
        row["status"] = "not run at this scale"
        row["ours"] = "not run"
        notes += short
    elif failed and not entry.get("expects_failure"):
        row["status"] = "run failed"
        notes.append("failed: " + "; ".join(failed))
    elif entry["kind"] == "quantitative" and entry["paper"] is None:
        row["status"] = "paper value not available"
    elif not at_scale:
        row["status"] = "not run at this scale"
        row["ours"] = f"smoke value at {row['scale']} / {row['dataset']}: {row['ours']}"
        notes.append(f"judged only at {comparable['scale']} / {comparable['dataset']}")
    elif entry["kind"] == "quantitative":
        ok = abs(values["ours"] - entry["paper"]) <= entry["test"]["tolerance"]
        row["status"] = "reproduced" if ok else "not reproduced"
    else:
        row["status"] = "reproduced" if _expect(entry["test"]["expect"], values) \
            else "not reproduced"
    if entry["paper"] is not None and isinstance(values.get("ours"), (int, float)) \
            and row["status"] != "not run at this scale":
        row["gap"] = _fmt(values["ours"] - entry["paper"])
    if row["scale"] == "default" and row["status"] not in ("not run at this scale",):
        # a synthetic row counts W seeds itself ("k of 5"); a training run is one seed
        notes.insert(0, "default scale" if entry["study"] == "synthetic"
                     else "default scale, one seed per run")
    if entry.get("condition") and row["status"] in ("reproduced", "not reproduced"):
        notes.append(f"under {entry['condition']}")
    row["note"] = "; ".join(notes)
    assert row["status"] in STATUSES, row
    return row


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


# --- run time --------------------------------------------------------------------------------

def _tracking_seconds(results: Path | None, patterns: list[str]) -> float | None:
    values = [json.loads(p.read_text()).get("tracking_s") for pattern in patterns
              for p in sorted(results.glob(pattern))] if results else []
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def runtime(bench: Path, threads: dict[str, int], results: Path | None = None) -> pd.DataFrame:
    """Job-seconds per study: the `s` column of each benchmarks/rules/<rule>[/...].tsv,
    times the job's threads (``threads["<rule>/<stem>"]``, else the rule's); and the tracking
    overhead: seconds in MLflow store calls (``tracking_s`` in the study's results) over the
    study's job wall seconds."""
    rows = []
    files = sorted(bench.glob("*.tsv")) + sorted(bench.glob("*/*.tsv"))
    seen = set()
    for study, info in STUDIES.items():
        total, wall, jobs = 0.0, 0.0, 0
        for path in files:
            rule = path.stem if path.parent == bench else path.parent.name
            if path in seen or not any(fnmatch.fnmatch(rule, pat) for pat in info["rules"]):
                continue
            seen.add(path)
            seconds = float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
            job = f"{rule}/{path.stem}"  # a job whose rule sets threads per job (torchrun)
            total += seconds * threads.get(job, threads.get(rule, 1))
            wall += seconds
            jobs += 1
        tracked = _tracking_seconds(results, info.get("results", []))
        rows.append({"study": study, "jobs": jobs, "job_s": round(total, 1),
                     "budget_s": info["budget_s"],
                     "job_s_over_budget": round(total / info["budget_s"], 2),
                     "job_s_over_15_min": round(total / DEFAULT_RUN_BUDGET_S, 3),
                     "tracking_s": None if tracked is None else round(tracked, 2),
                     "tracking_over_wall": round(tracked / wall, 3) if tracked and wall else None})
    frame = pd.DataFrame(rows)
    total = frame["job_s"].sum()
    tracked = frame["tracking_s"].dropna()
    frame.loc[len(frame)] = {"study": "all", "jobs": int(frame["jobs"].sum()),
                             "job_s": round(total, 1), "budget_s": DEFAULT_RUN_BUDGET_S,
                             "job_s_over_budget": round(total / DEFAULT_RUN_BUDGET_S, 2),
                             "job_s_over_15_min": round(total / DEFAULT_RUN_BUDGET_S, 3),
                             "tracking_s": round(tracked.sum(), 2) if len(tracked) else None,
                             "tracking_over_wall": None}
    return frame


# --- CLI -------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--results", default="results")
    parser.add_argument("--benchmarks", default="benchmarks/rules")
    parser.add_argument("--out", default="figures/report")
    parser.add_argument("--scale", default="default")
    parser.add_argument("--threads", default="{}", help="JSON {rule: threads}")


def main(args) -> int:
    ref = reference()
    rows = [evaluate(entry, Path(args.results), args.scale) for entry in ref["claims"]]
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    write_csv(frame, out / "paper_vs_ours.csv")
    shown = frame.drop(columns=["run_ids", "commits"])
    counts = frame["status"].value_counts().to_dict()
    head = (f"Paper vs ours — pipeline scale: {args.scale}. Statuses: "
            + ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES) + ".")
    with atomic_path(out / "paper_vs_ours.md") as tmp:
        tmp.write_text(f"{head}\n\n{shown.to_markdown(index=False)}\n")
    with atomic_path(out / "paper_vs_ours.html") as tmp:
        tmp.write_text(f"<p>{head}</p>\n" + shown.to_html(index=False, escape=True) + "\n")
    dev = pd.DataFrame(ref["deviations"])
    with atomic_path(out / "deviations.md") as tmp:
        tmp.write_text("Deviations from the paper (pipeline/figures/reference.yaml)\n\n"
                       f"{dev.to_markdown(index=False)}\n")
    ran = frame[frame["ours"] != "not run"]
    write_caption(out / "report_caption.rst", what=head, scale=args.scale,
                  dataset=", ".join(sorted({d for v in ran["dataset"] for d in v.split(",") if d}))
                  or "none",
                  run_ids=[i for v in frame["run_ids"] for i in v.split(",") if i],
                  commits=[c for v in frame["commits"] for c in v.split(",") if c])
    times = runtime(Path(args.benchmarks), json.loads(args.threads), Path(args.results))
    write_csv(times, out / "runtime.csv")
    with atomic_path(out / "runtime.md") as tmp:
        every = times.set_index("study")["job_s"]
        share = every["report"] / every["all"] if every["all"] else float("nan")
        tmp.write_text(
            "Job-seconds per study (benchmarks/rules/, s x threads) against its budget and the "
            "15-minute default run. tracking_s: seconds in MLflow store calls, from the "
            "study's results (tracking_s); tracking_over_wall: that over the study's job wall "
            f"seconds. The report's own job: {share:.2%} of all job-seconds (the paper_vs_ours "
            "job of the run before it: its benchmark file is written after it ends)."
            f"\n\n{times.to_markdown(index=False)}\n")
    print(head)
    print(shown[["id", "status", "ours", "paper"]].to_string(index=False))
    print(times.to_string(index=False))
    return 0
