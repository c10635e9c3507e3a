# DEQ-Transformer language modelling (appendix §4.3): one job per entry of lm.runs, built
# with the training-study helpers of common.smk, then the study's table and figures.

LM_RUNS = run_names("lm")


rule train_lm:
    input:
        unpack(train_inputs("lm")),
    output:
        metrics="results/lm/{run}/metrics.json",
        curves="results/lm/{run}/curves.csv",
        model="results/lm/{run}/model.pt",
    log:
        "logs/train_lm/{run}.log",
    benchmark:
        "benchmarks/rules/train_lm/{run}.tsv"
    wildcard_constraints:
        run="|".join(LM_RUNS),
    conda:
        "../../envs/pipeline.yaml"
    threads: train_nproc("lm")
    resources:
        **job_resources("lm"),
    params:
        **train_params("lm", "train_lm"),
        launcher=train_launcher("lm"),
    shell:
        LAUNCHED_TRAIN_SHELL


rule report_lm:
    input:
        metrics=expand("results/lm/{run}/metrics.json", run=LM_RUNS),
        curves=expand("results/lm/{run}/curves.csv", run=LM_RUNS),
    output:
        table_csv="figures/lm/lm_table.csv",
        table=report(
            "figures/lm/lm_table.md", caption="../report/lm_table.rst", category="lm"
        ),
        training=report(
            "figures/lm/lm_ppl_time.png",
            caption="../report/lm_ppl_time.rst",
            category="lm",
        ),
        training_pdf="figures/lm/lm_ppl_time.pdf",
        rho=report(
            "figures/lm/lm_rho.png", caption="../report/lm_rho.rst", category="lm"
        ),
        rho_pdf="figures/lm/lm_rho.pdf",
        caption="figures/lm/lm_caption.rst",
        metrics="figures/lm/lm_metrics.json",
    log:
        "logs/report_lm.log",
    benchmark:
        "benchmarks/rules/report_lm.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        dirs=expand("results/lm/{run}", run=LM_RUNS),
    shell:
        "python -m pipeline report-lm --results {params.dirs} --out figures/lm > {log} 2>&1"


rule lm:
    """Every DEQ-Transformer table and figure: `snakemake --cores all lm`."""
    input:
        rules.report_lm.output,
    localrule: True
