# Data acquisition: one rule per dataset, each writing data/<name>/ in the layout
# of pipeline/data/layout.py (train.npz, test.npz, meta.json). DVC versions these
# folders (dvc.yaml); nothing here, or anywhere else, downloads data implicitly.
#
# Needs PARAMS from common.smk. Consumer rules take a dataset's files
# through dataset_files(name) (common.smk), which marks them ancient(): `dvc pull`
# restores them with fresh mtimes, and that alone must not rerun the consumers.

DATA_ROOT = PARAMS["data"]["root"]


rule export_digits:
    output:
        train=f"{DATA_ROOT}/digits/train.npz",
        test=f"{DATA_ROOT}/digits/test.npz",
        meta=f"{DATA_ROOT}/digits/meta.json",
    params:
        out=subpath(output.meta, parent=True),
        test_fraction=PARAMS["data"]["digits"]["test_fraction"],
        seed=PARAMS["data"]["digits"]["seed"],
    log:
        "logs/export_digits.log",
    benchmark:
        "benchmarks/rules/export_digits.tsv"
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline data digits --out {params.out:q}"
        " --test-fraction {params.test_fraction} --seed {params.seed} > {log} 2>&1"


# No retries: a wrong checksum or a dead URL does not heal by itself, and the
# error message says what to set instead (mirror, archive) or to `dvc pull`.
rule download_cifar10:
    output:
        train=f"{DATA_ROOT}/cifar10/train.npz",
        test=f"{DATA_ROOT}/cifar10/test.npz",
        meta=f"{DATA_ROOT}/cifar10/meta.json",
    params:
        out=subpath(output.meta, parent=True),
        url=PARAMS["data"]["cifar10"]["url"],
        md5=PARAMS["data"]["cifar10"]["md5"],
        mirror=PARAMS["data"]["cifar10"]["mirror"] or "",
        archive=PARAMS["data"]["cifar10"]["archive"] or "",
        limits=download_limits(),
    log:
        "logs/download_cifar10.log",
    benchmark:
        "benchmarks/rules/download_cifar10.tsv"
    conda:
        "../../envs/pipeline.yaml"
    localrule: True  # cluster nodes often have no internet; the login node does
    shell:
        "python -m pipeline data cifar10 --out {params.out:q} --url {params.url:q}"
        " --md5 {params.md5} --mirror={params.mirror:q} --archive={params.archive:q}"
        " {params.limits} > {log} 2>&1"


rule validate_imagenet:
    output:
        manifest=f"{DATA_ROOT}/imagenet/manifest.json",
    params:
        root=PARAMS["data"]["imagenet"]["root"] or "",
    log:
        "logs/validate_imagenet.log",
    benchmark:
        "benchmarks/rules/validate_imagenet.tsv"
    conda:
        "../../envs/pipeline.yaml"
    localrule: True  # reads only file names and a few images: not worth a cluster job
    shell:
        "python -m pipeline data imagenet --root={params.root:q}"
        " --manifest {output.manifest:q} > {log} 2>&1"
