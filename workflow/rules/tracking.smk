# The MLflow store is created once here, before any tracked job runs in parallel
# (concurrent schema migrations race), with each study's parent run for every scale; a
# job finds its parent by study and scale (or makes it, for a study added later).
# Consumers take it as ancient() input.


rule init_tracking:
    output:
        ready="mlruns/.ready",
    params:
        uri=TRACKING["uri"],
        artifacts=TRACKING["artifacts"],
        experiments=["synthetic", *TRAIN_STUDIES],
        scales=["default", *(PARAMS.get("scales") or {})],  # all of them: a scale switch
                                                            # must not rerun this rule
    log:
        "logs/init_tracking.log",
    benchmark:
        "benchmarks/rules/init_tracking.tsv"
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline init-tracking --uri {params.uri} --artifacts {params.artifacts}"
        " --experiments {params.experiments} --scales {params.scales}"
        " --touch {output.ready} > {log} 2>&1"
