# Phantom-gradient pipeline: `snakemake --cores all figures` builds every figure and table.
# Setup only: validation and helpers live in workflow/rules/common.smk, rules in one file per stage.
import sys

from snakemake.utils import min_version

from pipeline.config import ParamsError, read_params

min_version("9.0")

# Parsed strictly first: Snakemake's own reader names neither the file nor the line of a
# syntax error, and lets a repeated key silently win.
try:
    for path in ["params.yaml", *workflow.overwrite_configfiles]:
        read_params(path)
except ParamsError as err:
    sys.exit(f"{err}\nNo job was started.")


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/synthetic.smk"
include: "workflow/rules/ablations.smk"
include: "workflow/rules/graph.smk"
include: "workflow/rules/vision.smk"
include: "workflow/rules/lm.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


rule figures:
    """Every figure and table that exists so far."""
    default_target: True
    input:
        rules.plot_synthetic.output,
        rules.report_ablations.output,
        rules.report_graph.output,
        rules.report_vision.output,
        rules.report_lm.output,
        rules.paper_vs_ours.output,
    localrule: True


onsuccess:
    report_failed_runs()


onerror:
    report_failed_runs()
