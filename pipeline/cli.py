"""``python -m pipeline <command> [options]``: one entry point per Snakemake rule.

Each command lives in a module with ``add_arguments(parser)`` and ``main(args)``;
only the chosen module is imported. SIGTERM (``scancel``, ``kill``, Snakemake ending
a job) raises :class:`~pipeline.signals.Terminated`, as SIGINT raises KeyboardInterrupt,
so a killed command cleans up as after any other failure: temporary files go, the MLflow
run is marked FAILED, the last checkpoint stays for the resume (``pipeline.signals``).
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from pipeline import signals

COMMANDS = {
    "validate": ("pipeline.config", "validate params.yaml against the schema"),
    "init-tracking": ("pipeline.tracking", "create the MLflow store and experiments once"),
    "synthetic": ("pipeline.experiments.synthetic", "synthetic study for one L_h (appendix §4.1, §4.4)"),
    "plot-synthetic": ("pipeline.figures.synthetic", "synthetic figures from results/synthetic"),
    "data": ("pipeline.data.cli", "download, verify and export a dataset"),
    "train": ("pipeline.experiments.train_job", "train one run of a training study (torchrun: DDP)"),
    "report-ablations": ("pipeline.figures.ablations", "ablation table and figures"),
    "report": ("pipeline.figures.report", "paper vs ours, deviations, run time per study"),
    "train-repeats": ("pipeline.experiments.repeats",
                      "train every fold or seed of one run in-process (IGNN)"),
    "report-graph": ("pipeline.figures.graph", "IGNN tables and figures"),
    "report-vision": ("pipeline.figures.vision", "large-scale vision table and figure"),
    "report-lm": ("pipeline.figures.lm", "DEQ-Transformer table and figures"),
}


def _usage() -> str:
    lines = ["usage: python -m pipeline <command> [options]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {name}",
                                     description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    signals.install()
    try:
        return int(module.main(args) or 0)
    except signals.Terminated as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 128 + signal.SIGTERM
