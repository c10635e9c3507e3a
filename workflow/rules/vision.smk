# Large-scale vision (appendix §4.3): one job per entry of vision.runs, built with the
# training-study helpers of common.smk; a run with nproc_per_node > 1 is launched with
# torchrun (train_launcher), its threads split over the ranks.

VISION_RUNS = run_names("vision")
# Each job's threads: one per rank; the run-time table counts a 2-rank job twice.
JOB_THREADS.update(
    {
        f"train_vision/{run}": run_config("vision", run).get("nproc_per_node", 1)
        for run in VISION_RUNS
    }
)


rule train_vision:
    input:
        unpack(train_inputs("vision")),
    output:
        metrics="results/vision/{run}/metrics.json",
        curves="results/vision/{run}/curves.csv",
        model="results/vision/{run}/model.pt",
    log:
        "logs/train_vision/{run}.log",
    benchmark:
        "benchmarks/rules/train_vision/{run}.tsv"
    wildcard_constraints:
        run="|".join(VISION_RUNS),
    conda:
        "../../envs/pipeline.yaml"
    threads: train_nproc("vision")
    resources:
        **job_resources("vision"),
    params:
        **train_params("vision", "train_vision"),
        launcher=train_launcher("vision"),
    shell:
        LAUNCHED_TRAIN_SHELL


rule report_vision:
    input:
        metrics=expand("results/vision/{run}/metrics.json", run=VISION_RUNS),
        curves=expand("results/vision/{run}/curves.csv", run=VISION_RUNS),
    output:
        table_csv="figures/vision/vision_table.csv",
        table=report(
            "figures/vision/vision_table.md",
            caption="../report/vision_table.rst",
            category="vision",
        ),
        training=report(
            "figures/vision/vision_training.png",
            caption="../report/vision_training.rst",
            category="vision",
        ),
        training_pdf="figures/vision/vision_training.pdf",
        caption="figures/vision/vision_caption.rst",
        metrics="figures/vision/vision_metrics.json",
    log:
        "logs/report_vision.log",
    benchmark:
        "benchmarks/rules/report_vision.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        dirs=expand("results/vision/{run}", run=VISION_RUNS),
    shell:
        "python -m pipeline report-vision --results {params.dirs} --out figures/vision > {log} 2>&1"


rule vision:
    """Every large-scale vision table and figure: `snakemake --cores all vision`."""
    input:
        rules.report_vision.output,
    localrule: True
