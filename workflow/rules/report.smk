# Paper vs ours (pipeline/figures/reference.yaml against results/) and the run time per
# study (benchmarks/rules/). Reads no torch; rebuilds in seconds.
from importlib import resources

REFERENCE = str(
    resources.files("pipeline.figures") / "reference.yaml"
)  # the package's file


rule paper_vs_ours:
    input:
        synthetic=rules.plot_synthetic.output,
        ablations=rules.report_ablations.output,
        graph=rules.report_graph.output,
        vision=rules.report_vision.output,
        lm=rules.report_lm.output,
        reference=REFERENCE,
    output:
        table_csv="figures/report/paper_vs_ours.csv",
        table=report(
            "figures/report/paper_vs_ours.md",
            caption="../report/paper_vs_ours.rst",
            category="paper vs ours",
        ),
        html=report(
            "figures/report/paper_vs_ours.html",
            caption="../report/paper_vs_ours.rst",
            category="paper vs ours",
        ),
        deviations=report(
            "figures/report/deviations.md",
            caption="../report/deviations.rst",
            category="paper vs ours",
        ),
        runtime_csv="figures/report/runtime.csv",
        runtime=report(
            "figures/report/runtime.md",
            caption="../report/runtime.rst",
            category="paper vs ours",
        ),
        caption="figures/report/report_caption.rst",
    log:
        "logs/paper_vs_ours.log",
    benchmark:
        "benchmarks/rules/paper_vs_ours.tsv"
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    params:
        scale=SCALE,
        threads=as_json(rule_threads()),
    shell:
        "python -m pipeline report --results results --benchmarks benchmarks/rules"
        " --out figures/report --scale {params.scale} --threads {params.threads:q} > {log} 2>&1"
