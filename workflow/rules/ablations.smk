# MDEQ-Tiny ablations (appendix §4.2): one job per entry of ablations.runs, built with the
# training-study helpers of common.smk.

ABLATION_NAMES = run_names("ablations")


rule train_ablation:
    input:
        unpack(train_inputs("ablations")),
    output:
        metrics="results/ablations/{run}/metrics.json",
        curves="results/ablations/{run}/curves.csv",
        model="results/ablations/{run}/model.pt",
    log:
        "logs/train_ablation/{run}.log",
    benchmark:
        "benchmarks/rules/train_ablation/{run}.tsv"
    wildcard_constraints:
        run="|".join(ABLATION_NAMES),
    conda:
        "../../envs/pipeline.yaml"
    threads: 1
    resources:
        **job_resources("ablations"),
    params:
        **train_params("ablations", "train_ablation"),
    shell:
        TRAIN_SHELL


rule report_ablations:
    input:
        metrics=expand("results/ablations/{run}/metrics.json", run=ABLATION_NAMES),
        curves=expand("results/ablations/{run}/curves.csv", run=ABLATION_NAMES),
    output:
        table_csv="figures/ablations/ablations_table.csv",
        table=report(
            "figures/ablations/ablations_table.md",
            caption="../report/ablations_table.rst",
            category="ablations",
        ),
        training=report(
            "figures/ablations/ablations_training.png",
            caption="../report/ablations_training.rst",
            category="ablations",
        ),
        training_pdf="figures/ablations/ablations_training.pdf",
        caption="figures/ablations/ablations_caption.rst",
        metrics="figures/ablations/ablations_metrics.json",
    log:
        "logs/report_ablations.log",
    benchmark:
        "benchmarks/rules/report_ablations.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        dirs=expand("results/ablations/{run}", run=ABLATION_NAMES),
    shell:
        "python -m pipeline report-ablations --results {params.dirs}"
        " --out figures/ablations > {log} 2>&1"
