# Synthetic spectral-normalised study (appendix §4.1, §4.4): one job per L_h.
# A job writes each finished chunk under checkpoints/synthetic/ (Snakemake deletes a failed
# job's outputs, not those); rerun, it resumes at its last finished chunk.

SYNTHETIC = PARAMS["synthetic"]
SYNTHETIC_LH = [
    lh_wildcard(Lh) for Lh in SYNTHETIC["Lh"]
]  # one folder per value, no collisions
# Each job depends on every synthetic key except the L_h list itself, so adding an
# L_h runs one new job and leaves the others alone.
SYNTHETIC_SLICE = as_json({k: v for k, v in SYNTHETIC.items() if k != "Lh"})


rule synthetic_study:
    input:
        tracking=ancient(TRACKING_READY),
    output:
        grid="results/synthetic/Lh={Lh}/grid.csv",
        dynamics="results/synthetic/Lh={Lh}/dynamics.csv",
        pairs="results/synthetic/Lh={Lh}/pairs.csv",
        summary="results/synthetic/Lh={Lh}/summary.json",
    log:
        "logs/synthetic_study/Lh={Lh}.log",
    benchmark:
        "benchmarks/rules/synthetic_study/Lh={Lh}.tsv"
    conda:
        "../../envs/pipeline.yaml"
    threads: 1
    resources:
        **job_resources("synthetic", gpu=int(SYNTHETIC["device"].startswith("cuda"))),
    params:
        synthetic=SYNTHETIC_SLICE,
        scale=SCALE,
        tracking=tracking_args(),
        tags=lambda wc: job_tags("synthetic_study", Lh=wc.Lh),
        out=subpath(output.summary, parent=True),
    shell:
        "python -m pipeline synthetic --Lh {wildcards.Lh} --params {params.synthetic:q}"
        " --scale {params.scale} --out {params.out} --checkpoints checkpoints {params.tracking}"
        " --tags {params.tags:q} --threads {threads} > {log} 2>&1"


rule plot_synthetic:
    input:
        summaries=expand("results/synthetic/Lh={Lh}/summary.json", Lh=SYNTHETIC_LH),
        grids=expand("results/synthetic/Lh={Lh}/grid.csv", Lh=SYNTHETIC_LH),
        dynamics=expand("results/synthetic/Lh={Lh}/dynamics.csv", Lh=SYNTHETIC_LH),
        pairs=expand("results/synthetic/Lh={Lh}/pairs.csv", Lh=SYNTHETIC_LH),
    output:
        cosine=report(
            "figures/synthetic/synthetic_cosine.png",
            caption="../report/synthetic_cosine.rst",
            category="synthetic",
        ),
        cosine_pdf="figures/synthetic/synthetic_cosine.pdf",
        dynamics=report(
            "figures/synthetic/synthetic_solver_dynamics.png",
            caption="../report/synthetic_dynamics.rst",
            category="synthetic",
        ),
        dynamics_pdf="figures/synthetic/synthetic_solver_dynamics.pdf",
        table_csv="figures/synthetic/synthetic_summary.csv",
        table=report(
            "figures/synthetic/synthetic_summary.md",
            caption="../report/synthetic_summary.rst",
            category="synthetic",
        ),
        caption="figures/synthetic/synthetic_caption.rst",
        metrics="figures/synthetic/synthetic_metrics.json",
    log:
        "logs/plot_synthetic.log",
    benchmark:
        "benchmarks/rules/plot_synthetic.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        dirs=expand("results/synthetic/Lh={Lh}", Lh=SYNTHETIC_LH),
    shell:
        "python -m pipeline plot-synthetic --results {params.dirs} --out figures/synthetic > {log} 2>&1"
