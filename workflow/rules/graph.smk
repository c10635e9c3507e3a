# IGNN (appendix §4.3): one job per entry of graph.runs (graph classification, every fold
# in one job) and node.runs (node classification, every seed in one job), built with the
# training-study helpers of common.smk; the command is `python -m pipeline train-repeats`.

GRAPH_RUNS = run_names("graph")
NODE_RUNS = run_names("node")
GRAPH_OUTPUTS = ("metrics.json", "curves.csv", "history.csv")


rule train_graph:
    input:
        unpack(train_inputs("graph")),
    output:
        metrics="results/graph/{run}/metrics.json",
        curves="results/graph/{run}/curves.csv",
        history="results/graph/{run}/history.csv",
        weights=directory("results/graph/{run}/weights"),
    log:
        "logs/train_graph/{run}.log",
    benchmark:
        "benchmarks/rules/train_graph/{run}.tsv"
    wildcard_constraints:
        run="|".join(GRAPH_RUNS),
    conda:
        "../../envs/pipeline.yaml"
    threads: 1
    resources:
        **job_resources("graph"),
    params:
        **train_params("graph", "train_graph"),
    shell:
        REPEATS_SHELL


rule train_node:
    input:
        unpack(train_inputs("node")),
    output:
        metrics="results/node/{run}/metrics.json",
        curves="results/node/{run}/curves.csv",
        history="results/node/{run}/history.csv",
        weights=directory("results/node/{run}/weights"),
    log:
        "logs/train_node/{run}.log",
    benchmark:
        "benchmarks/rules/train_node/{run}.tsv"
    wildcard_constraints:
        run="|".join(NODE_RUNS),
    conda:
        "../../envs/pipeline.yaml"
    threads: 1
    resources:
        **job_resources("node"),
    params:
        **train_params("node", "train_node"),
    shell:
        REPEATS_SHELL


rule report_graph:
    input:
        graph=expand("results/graph/{run}/{f}", run=GRAPH_RUNS, f=GRAPH_OUTPUTS),
        node=expand("results/node/{run}/{f}", run=NODE_RUNS, f=GRAPH_OUTPUTS),
    output:
        table_csv="figures/graph/graph_table.csv",
        table=report(
            "figures/graph/graph_table.md",
            caption="../report/graph_table.rst",
            category="graph",
        ),
        folds=report(
            "figures/graph/graph_folds.png",
            caption="../report/graph_folds.rst",
            category="graph",
        ),
        folds_pdf="figures/graph/graph_folds.pdf",
        f1=report(
            "figures/graph/graph_f1.png",
            caption="../report/graph_f1.rst",
            category="graph",
        ),
        f1_pdf="figures/graph/graph_f1.pdf",
        dynamics=report(
            "figures/graph/graph_dynamics.png",
            caption="../report/graph_dynamics.rst",
            category="graph",
        ),
        dynamics_pdf="figures/graph/graph_dynamics.pdf",
        caption="figures/graph/graph_caption.rst",
        metrics="figures/graph/graph_metrics.json",
    log:
        "logs/report_graph.log",
    benchmark:
        "benchmarks/rules/report_graph.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        dirs=expand("results/graph/{run}", run=GRAPH_RUNS)
        + expand("results/node/{run}", run=NODE_RUNS),
    shell:
        "python -m pipeline report-graph --results {params.dirs} --out figures/graph > {log} 2>&1"


rule graph:
    """Every IGNN table and figure: `snakemake --cores all graph`."""
    input:
        rules.report_graph.output,
    localrule: True
