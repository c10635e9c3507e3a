# MDEQ-Tiny ablations (appendix §4.2): one job per entry of ablations.runs.
# Each job's params are its own merged entry, so editing one entry reruns only that job
# (and the report); editing ablations.defaults reruns them all.

ABLATIONS = PARAMS["ablations"]
ABLATION_NAMES = list(ABLATIONS["runs"])


wildcard_constraints:
    ablation="|".join(ABLATION_NAMES),


rule train_ablation:
    input:
        data=lambda wc: dataset_files(ablation_params(wc.ablation)["dataset"]),
        tracking=ancient(TRACKING_READY),
    output:
        metrics="results/ablations/{ablation}/metrics.json",
        curves="results/ablations/{ablation}/curves.csv",
    params:
        run=lambda wc: as_json(ablation_params(wc.ablation)),
        data_dir=lambda wc: f"{PARAMS['data']['root']}/{ablation_params(wc.ablation)['dataset']}",
        out=subpath(output.metrics, parent=True),
        scale=SCALE,
        tracking=tracking_args(),
        tags=lambda wc: job_tags("train_ablation", ablation=wc.ablation),
    log:
        "logs/train_ablation/{ablation}.log",
    benchmark:
        "benchmarks/rules/train_ablation/{ablation}.tsv"
    threads: 1
    resources:
        gpu=lambda wc: int(ablation_params(wc.ablation)["device"].startswith("cuda")),
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline train --name {wildcards.ablation} --params {params.run:q}"
        " --data {params.data_dir:q} --out {params.out:q} --checkpoints checkpoints/ablations"
        " --scale {params.scale} {params.tracking} --tags {params.tags:q} --threads {threads}"
        " > {log} 2>&1"


rule report_ablations:
    input:
        metrics=expand("results/ablations/{ablation}/metrics.json", ablation=ABLATION_NAMES),
        curves=expand("results/ablations/{ablation}/curves.csv", ablation=ABLATION_NAMES),
    output:
        table=multiext("figures/ablations/ablations_table", ".csv", ".md"),
        training=multiext("figures/ablations/ablations_training", ".png", ".pdf"),
    params:
        dirs=expand("results/ablations/{ablation}", ablation=ABLATION_NAMES),
    log:
        "logs/report_ablations.log",
    benchmark:
        "benchmarks/rules/report_ablations.tsv"
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline report-ablations --results {params.dirs}"
        " --out figures/ablations > {log} 2>&1"
