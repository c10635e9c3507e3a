"""benchmarks/suite_cost.py: the census records every Python process a command starts, and
a process's floor is that of what it imported, never more than its CPU."""
from __future__ import annotations

import sys

from benchmarks import suite_cost

FLOORS = {"python": 0.01, "torch": 2.0, "torch+dynamo": 3.5,
          "torch+dynamo+mlflow store": 6.0, "mlflow store": 2.5, "snakemake": 1.6}


def test_the_census_records_each_python_process_that_exits_normally(tmp_path):
    child = "import json"
    forked = "import os; os._exit(0)"  # as a forked rank ends: no atexit, so not recorded
    cmd = [sys.executable, "-c", "import subprocess, sys; "
           f"subprocess.run([sys.executable, '-c', {child!r}]); "
           f"subprocess.run([sys.executable, '-c', {forked!r}])"]
    rows, totals = suite_cost.census(cmd, FLOORS, tmp_path, settle_s=0.0)
    assert totals["returncode"] == 0 and totals["processes"] == 2, rows  # parent and child
    pids = {r["pid"] for r in rows}
    assert sum(r["ppid"] in pids for r in rows) == 1, rows  # the child names the parent
    assert {r["kind"] for r in rows} == {"python"}
    assert all(0 <= r["floor_s"] <= min(r["cpu_s"], FLOORS["python"]) for r in rows)
    assert totals["unrecorded_cpu_s"] == totals["machine_cpu_s"] - totals["recorded_cpu_s"]


def test_a_process_gets_the_largest_floor_of_what_it_imported():
    assert suite_cost.kind_of(["torch", "torch._dynamo", "mlflow"], FLOORS) == \
        "torch+dynamo+mlflow store"
    assert suite_cost.kind_of(["torch", "mlflow"], FLOORS) == "mlflow store"  # no dynamo
    assert suite_cost.kind_of(["torch"], FLOORS) == "torch"
    assert suite_cost.kind_of(["snakemake"], FLOORS) == "snakemake"
    assert suite_cost.kind_of([], FLOORS) == "python"
    assert suite_cost.kind_of(["_pytest", "torch"], FLOORS) == "pytest"


def test_the_floor_of_a_bare_interpreter_is_measured():
    rows = suite_cost.measure_floors(["python"], repeats=1)
    assert [r["kind"] for r in rows] == ["python"] and rows[0]["repeats"] == 1
    assert 0 < rows[0]["cpu_s"] < 5 and rows[0]["wall_s"] > 0


def test_a_command_without_census_is_refused(capsys):
    import pytest
    with pytest.raises(SystemExit):
        suite_cost.main(["--kinds", "python", "--repeats", "1", "--", "true"])
    assert "only with --census" in capsys.readouterr().err
