# Phantom-gradient pipeline: `snakemake --cores all figures` builds every figure and table.
# Setup only: validation and helpers live in workflow/rules/common.smk, rules in one file per stage.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/synthetic.smk"
include: "workflow/rules/ablations.smk"


rule figures:
    """Every figure and table that exists so far."""
    input:
        rules.plot_synthetic.output,
        rules.report_ablations.output,
    localrule: True
    default_target: True
