"""Where the test suite's CPU goes: how much of it is Python processes starting up.

    .venv/bin/python -m benchmarks.suite_cost              # the import floor, about a minute
    .venv/bin/python -m benchmarks.suite_cost --census     # and one run of the suite (~8 min)
    .venv/bin/python -m benchmarks.suite_cost --census -- .venv/bin/python -m pytest tests/x.py

1. **Import floor** (``process_floor.csv``): the CPU seconds of a fresh interpreter that
   imports and does nothing else (one thread, median of ``--repeats``), by what it
   imports: Python alone; torch; torch and TorchDynamo (building a ``torch.optim``
   optimizer and ``torch.use_deterministic_algorithms`` import it); those, MLflow and its
   SQLite store opened, as every training job does; MLflow and its store alone
   (``init-tracking``); Snakemake (``snakemake --version``).
2. **Census** (``--census``, ``suite_processes.csv``): runs a command (default: the
   README's test command) with a ``sitecustomize`` on ``PYTHONPATH`` that makes every Python
   process it starts (pytest and its workers, Snakemake and its jobs, the tests'
   subprocesses) record at exit its CPU seconds and which of torch, TorchDynamo, MLflow,
   Snakemake and pytest it imported. A process's floor is the floor of what it imported,
   at most its CPU: an upper bound of its start-up cost where the process imported but
   never opened a store (the floor kind includes that). A process that ends by a signal or
   ``os._exit`` (killed jobs, forked DDP ranks), one started with ``-I``, ``-E`` or an
   environment without ``SUITE_CENSUS``, and one that ends more than ``SETTLE_S`` after
   the command records nothing: the machine's CPU over the run (``/proc/stat``, which also
   counts any other load) minus the recorded CPU is printed as unrecorded. The
   ``sitecustomize`` hides any other one on the path for the run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, write_csv
from pipeline.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STORE = "from mlflow.tracking import MlflowClient; MlflowClient(tracking_uri='{uri}')"
# name: (what it imports, the modules that mark a process as having imported it)
FLOORS = {
    "python": ("pass", ()),
    "torch": ("import torch", ("torch",)),
    "torch+dynamo": ("import torch, torch._dynamo", ("torch", "torch._dynamo")),
    "torch+dynamo+mlflow store": ("import torch, torch._dynamo, mlflow; " + STORE,
                                  ("torch", "torch._dynamo", "mlflow")),
    "mlflow store": ("import mlflow; " + STORE, ("mlflow",)),
    "snakemake": (None, ("snakemake",)),  # `snakemake --version`
}
FLOOR_COLUMNS = ["kind", "cpu_s", "wall_s", "repeats", "cpu", "load_average"]
PROCESS_COLUMNS = ["kind", "cpu_s", "wall_s", "floor_s", "pid", "ppid", "argv"]

SITECUSTOMIZE = '''
import atexit, json, os, sys, time
_T0, _LOG = time.time(), os.environ.get("SUITE_CENSUS")

def _record():
    t = os.times()
    seen = [m for m in ("torch", "torch._dynamo", "mlflow", "snakemake", "_pytest")
            if m in sys.modules]
    line = json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cpu_s": t.user + t.system,
                       "wall_s": time.time() - _T0, "modules": seen,
                       "argv": " ".join(sys.argv)[:200]})
    try:  # one short append per process; never a traceback in a test's output
        with open(_LOG, "a") as fh:
            fh.write(line + "\\n")
    except OSError:
        pass

if _LOG:
    atexit.register(_record)
'''
SETTLE_S = 10.0  # a process that outlives the command (a fork server) records after it ends


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _machine_cpu() -> float:
    """CPU seconds the whole machine has spent (user, nice, system), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return float("nan")
    return sum(int(x) for x in fields[1:4]) / os.sysconf("SC_CLK_TCK")


def _one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure_floors(kinds: list[str], repeats: int) -> list[dict]:
    """Each kind's median CPU and wall seconds over ``repeats`` fresh processes (after one
    untimed start that fills the page cache and creates the store)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for kind in kinds:
            code = FLOORS[kind][0]
            cmd = ([str(BIN / "snakemake"), "--version"] if code is None
                   else [sys.executable, "-c", code.format(uri=uri)])
            cpu, wall = [], []
            for rep in range(repeats + 1):
                c0, w0 = _child_cpu(), time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=_one_thread(), cwd=tmp)
                if rep:  # repeat 0 is the warm-up
                    cpu.append(_child_cpu() - c0)
                    wall.append(time.perf_counter() - w0)
            rows.append(dict(kind=kind, cpu_s=statistics.median(cpu),
                             wall_s=statistics.median(wall), repeats=repeats))
    for r in rows:
        r.update(cpu=cpu_model(), load_average=load_average())
    return rows


def kind_of(modules: list[str], floors: dict[str, float]) -> str:
    """The floor kind of a process that imported ``modules``: of the kinds whose modules it
    imported, the one with the largest floor (for a mix no kind measures, such as torch
    and MLflow without TorchDynamo, a lower bound). pytest's own processes are "pytest":
    they run tests in-process, so none of their CPU counts as floor."""
    if "_pytest" in modules:
        return "pytest"
    matching = [k for k, (_, marks) in FLOORS.items() if all(m in modules for m in marks)]
    return max(matching, key=lambda k: floors.get(k, 0.0))


def census(command: list[str], floors: dict[str, float], cwd: Path,
           settle_s: float = SETTLE_S) -> tuple[list[dict], dict]:
    """Run ``command`` with the recording ``sitecustomize``; return one row per recorded
    process and the totals."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "sitecustomize.py").write_text(SITECUSTOMIZE)
        log = Path(tmp, "census.jsonl")
        path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH", "")) if p)
        m0, w0 = _machine_cpu(), time.perf_counter()
        # the caller's environment, as `make test` has it (the workers set one thread)
        env = {**os.environ, "PYTHONPATH": path, "SUITE_CENSUS": str(log)}
        proc = subprocess.run(command, cwd=cwd, env=env)
        wall, machine = time.perf_counter() - w0, _machine_cpu() - m0
        time.sleep(settle_s)
        records = []
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a record cut short: skip it, keep the run
                continue
    rows = []
    for r in records:
        kind = kind_of(r["modules"], floors)
        floor = 0.0 if kind == "pytest" else min(r["cpu_s"], floors.get(kind, 0.0))
        rows.append(dict(kind=kind, cpu_s=r["cpu_s"], wall_s=r["wall_s"], floor_s=floor,
                         pid=r["pid"], ppid=r["ppid"], argv=r["argv"]))
    recorded = sum(r["cpu_s"] for r in rows)
    totals = dict(returncode=proc.returncode, wall_s=wall, machine_cpu_s=machine,
                  recorded_cpu_s=recorded, unrecorded_cpu_s=machine - recorded,
                  processes=len(rows), floor_s=sum(r["floor_s"] for r in rows),
                  subprocess_cpu_s=sum(r["cpu_s"] for r in rows if r["kind"] != "pytest"))
    return rows, totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", choices=list(FLOORS), default=list(FLOORS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks")
    p.add_argument("--census", action="store_true", help="and run the command (below)")
    p.add_argument("command", nargs="*",
                   default=[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                   help="what --census runs from the repository root, after `--` "
                        "(default: the README's test command)")
    args = p.parse_args(argv)
    if args.command != p.get_default("command") and not args.census:
        p.error("a command is run only with --census")
    floors = measure_floors(args.kinds, args.repeats)
    write_csv(floors, args.out / "process_floor.csv", FLOOR_COLUMNS)
    for r in floors:
        print(f"{r['kind']:>26}: {r['cpu_s']:.2f} CPU-s, {r['wall_s']:.2f} s wall")
    if not args.census:
        return 0
    rows, t = census(args.command, {r["kind"]: r["cpu_s"] for r in floors}, ROOT)
    write_csv(sorted(rows, key=lambda r: -r["cpu_s"]), args.out / "suite_processes.csv",
              PROCESS_COLUMNS)
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    for kind, rs in sorted(by_kind.items(), key=lambda kv: -sum(r["cpu_s"] for r in kv[1])):
        print(f"{kind:>26}: {len(rs):4d} processes, {sum(r['cpu_s'] for r in rs):7.1f} CPU-s, "
              f"floor {sum(r['floor_s'] for r in rs):6.1f}")
    print(f"exit {t['returncode']}, {t['wall_s']:.0f} s wall; machine {t['machine_cpu_s']:.0f} "
          f"CPU-s, recorded {t['recorded_cpu_s']:.0f} ({t['processes']} processes), "
          f"unrecorded {t['unrecorded_cpu_s']:.0f}; subprocesses {t['subprocess_cpu_s']:.0f} "
          f"CPU-s, of which import floor {t['floor_s']:.0f}")
    return 0 if t["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
