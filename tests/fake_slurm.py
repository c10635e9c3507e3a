"""Stand-in SLURM commands for tests/test_slurm.py: each records its arguments, and
``sbatch`` "runs" a job by creating the files that Snakemake's dry run listed for it.

``install(bin_dir, state_dir, jobs)`` writes ``sbatch``, ``sacct``, ``squeue``,
``scontrol``, ``sinfo``, ``srun``, ``sacctmgr``, ``sshare`` and ``scancel`` into bin_dir;
``jobs`` maps the plugin's ``--comment`` (``rule_<rule>[_wildcards_<values>]``) to the
job's output files. Every call appends ``{"cmd": name, "argv": [...]}`` to
``state_dir/calls.jsonl``.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

COMMANDS = ("sbatch", "sacct", "squeue", "scontrol", "sinfo", "srun", "sacctmgr", "sshare",
            "scancel")

SCRIPT = """#!{python}
import sys
sys.path.insert(0, {here!r})
import fake_slurm
sys.exit(fake_slurm.main({name!r}, {state!r}, sys.argv[1:]))
"""


def install(bin_dir: Path, state_dir: Path, jobs: dict[str, list[str]]) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jobs.json").write_text(json.dumps(jobs))
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(SCRIPT.format(python=sys.executable, here=str(Path(__file__).parent),
                                      name=name, state=str(state_dir)))
        path.chmod(0o755)


def calls(state_dir: Path, name: str | None = None) -> list[list[str]]:
    path = state_dir / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["argv"] for r in rows if name in (None, r["cmd"])]


def dry_run_jobs(text: str) -> dict[str, list[str]]:
    """{plugin comment: outputs and benchmark file} from the job blocks of ``snakemake -n``."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        head = re.match(r"(?:local)?rule (\w+):", block)
        outputs = re.search(r"^\s+output: (.+)$", block, re.M)
        if not head or not outputs:
            continue
        wildcards = re.search(r"^\s+wildcards: (.+)$", block, re.M)
        values = [kv.split("=", 1)[1] for kv in wildcards.group(1).split(", ")] if wildcards else []
        comment = f"rule_{head.group(1)}" + (f"_wildcards_{'_'.join(values)}".replace("/", "_")
                                             if values else "")
        files = [o.strip() for o in outputs.group(1).split(", ")]
        bench = re.search(r"^\s+benchmark: (.+)$", block, re.M)
        jobs[comment] = files + ([bench.group(1).strip()] if bench else [])
    return jobs


def _record(state: Path, name: str, argv: list[str]) -> None:
    with open(state / "calls.jsonl", "a") as f:
        f.write(json.dumps({"cmd": name, "argv": argv}) + "\n")


def _submitted(state: Path) -> list[str]:
    return [str(i + 1) for i, _ in enumerate(calls(state, "sbatch"))]


def main(name: str, state: str, argv: list[str]) -> int:
    state = Path(state)
    _record(state, name, argv)
    if name == "sbatch":
        if "/dev/stdin" in argv:
            sys.stdin.read()
        comment = argv[argv.index("--comment") + 1]
        workdir = Path(argv[argv.index("-D") + 1]) if "-D" in argv else Path.cwd()
        outputs = json.loads((state / "jobs.json").read_text())[comment]
        for out in outputs:  # the job "ran": its declared outputs exist
            path = workdir / out
            if not path.suffix:  # a directory() output (the dry run does not say which)
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}" if path.suffix == ".json" else "")
        print(len(_submitted(state)))
    elif name == "sacct" and "-nu" in argv:  # the default account
        print("testaccount")
    elif name in ("sacct", "squeue"):
        print("\n".join(f"{job}|COMPLETED" for job in _submitted(state)))
    elif name == "scontrol":
        print("MinJobAge               = 300 sec")
    elif name == "sacctmgr" or name == "sshare":
        print("testaccount")
    elif name == "sinfo":
        print("gpu*")
    return 0
