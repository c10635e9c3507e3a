# The MLflow store is created once here, before any tracked job runs in parallel
# (concurrent schema migrations race). A study's parent run for a scale is made by its
# first job at that scale. Consumers take it as ancient() input.


rule init_tracking:
    output:
        ready="mlruns/.ready",
    log:
        "logs/init_tracking.log",
    benchmark:
        "benchmarks/rules/init_tracking.tsv"
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    params:
        uri=TRACKING["uri"],
        artifacts=TRACKING["artifacts"],
        experiments=["synthetic", *TRAIN_STUDIES],
    shell:
        "python -m pipeline init-tracking --uri {params.uri} --artifacts {params.artifacts}"
        " --experiments {params.experiments}"
        " --touch {output.ready} > {log} 2>&1"
