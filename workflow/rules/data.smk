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
    log:
        "logs/export_digits.log",
    benchmark:
        "benchmarks/rules/export_digits.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
        test_fraction=PARAMS["data"]["digits"]["test_fraction"],
        seed=PARAMS["data"]["digits"]["seed"],
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
    log:
        "logs/download_cifar10.log",
    benchmark:
        "benchmarks/rules/download_cifar10.tsv"
    localrule: True  # cluster nodes often have no internet; the login node does
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
        url=PARAMS["data"]["cifar10"]["url"],
        md5=PARAMS["data"]["cifar10"]["md5"],
        mirror=PARAMS["data"]["cifar10"]["mirror"] or "",
        archive=PARAMS["data"]["cifar10"]["archive"] or "",
        limits=download_limits(),
    shell:
        "python -m pipeline data cifar10 --out {params.out:q} --url {params.url:q}"
        " --md5 {params.md5} --mirror={params.mirror:q} --archive={params.archive:q}"
        " {params.limits} > {log} 2>&1"


rule validate_imagenet:
    output:
        manifest=f"{DATA_ROOT}/imagenet/manifest.json",
    log:
        "logs/validate_imagenet.log",
    benchmark:
        "benchmarks/rules/validate_imagenet.tsv"
    localrule: True  # reads only file names and a few images: not worth a cluster job
    conda:
        "../../envs/pipeline.yaml"
    params:
        root=PARAMS["data"]["imagenet"]["root"] or "",
        checksums="--checksums" if PARAMS["data"]["imagenet"]["checksums"] else "",
    shell:
        "python -m pipeline data imagenet --root={params.root:q}"
        " --manifest {output.manifest:q} {params.checksums} > {log} 2>&1"


# --- graph datasets (pipeline/data/graphs.py): data/<name>/{graphs.npz, meta.json} ----------


rule export_mutag:
    output:
        graphs=f"{DATA_ROOT}/mutag/graphs.npz",
        meta=f"{DATA_ROOT}/mutag/meta.json",
    log:
        "logs/export_mutag.log",
    benchmark:
        "benchmarks/rules/export_mutag.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
    shell:
        "python -m pipeline data mutag --out {params.out:q} > {log} 2>&1"


rule export_chains:
    output:
        graphs=f"{DATA_ROOT}/chains/graphs.npz",
        meta=f"{DATA_ROOT}/chains/meta.json",
    log:
        "logs/export_chains.log",
    benchmark:
        "benchmarks/rules/export_chains.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
        seed=PARAMS["data"]["chains"]["seed"],
    shell:
        "python -m pipeline data chains --out {params.out:q} --seed {params.seed} > {log} 2>&1"


rule download_tu:
    output:
        graphs=f"{DATA_ROOT}/{{tu}}/graphs.npz",
        meta=f"{DATA_ROOT}/{{tu}}/meta.json",
    log:
        "logs/download_tu/{tu}.log",
    benchmark:
        "benchmarks/rules/download_tu/{tu}.tsv"
    wildcard_constraints:
        tu="|".join(TU_NAMES),
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
        name=lambda wc: TU_NAMES[wc.tu],
        url=lambda wc: tu_param(wc, "url"),
        mirror=lambda wc: tu_param(wc, "mirror"),
        archive=lambda wc: tu_param(wc, "archive"),
        sha256=lambda wc: tu_param(wc, "sha256"),
        limits=download_limits(),
    shell:
        "python -m pipeline data tu --name {params.name} --out {params.out:q} --url {params.url:q}"
        " --mirror={params.mirror:q} --archive={params.archive:q} --sha256={params.sha256:q}"
        " {params.limits} > {log} 2>&1"


rule download_ppi:
    output:
        graphs=f"{DATA_ROOT}/ppi/graphs.npz",
        meta=f"{DATA_ROOT}/ppi/meta.json",
    log:
        "logs/download_ppi.log",
    benchmark:
        "benchmarks/rules/download_ppi.tsv"
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
        url=PARAMS["data"]["ppi"]["url"],
        mirror=PARAMS["data"]["ppi"]["mirror"] or "",
        archive=PARAMS["data"]["ppi"]["archive"] or "",
        sha256=PARAMS["data"]["ppi"]["sha256"] or "",
        limits=download_limits(),
    shell:
        "python -m pipeline data ppi --out {params.out:q} --url {params.url:q}"
        " --mirror={params.mirror:q} --archive={params.archive:q} --sha256={params.sha256:q}"
        " {params.limits} > {log} 2>&1"


# The default scale's stand-in for ImageNet: the digits (the same split as export_digits)
# as a 32x32 RGB ImageFolder tree, with the manifest the ImageNet loader reads.
rule export_digits_imagefolder:
    output:
        train=directory(f"{DATA_ROOT}/digits_imagefolder/train"),
        val=directory(f"{DATA_ROOT}/digits_imagefolder/val"),
        manifest=f"{DATA_ROOT}/digits_imagefolder/manifest.json",
    log:
        "logs/export_digits_imagefolder.log",
    benchmark:
        "benchmarks/rules/export_digits_imagefolder.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.manifest, parent=True),
        test_fraction=PARAMS["data"]["digits"]["test_fraction"],
        seed=PARAMS["data"]["digits"]["seed"],
        size=PARAMS["data"]["digits_imagefolder"]["size"],
    shell:
        "python -m pipeline data digits-imagefolder --out {params.out:q} --size {params.size}"
        " --test-fraction {params.test_fraction} --seed {params.seed} > {log} 2>&1"


# --- language modelling (pipeline/data/wikitext.py): data/<name>/{train,valid,test}.npz,
# vocab.txt, meta.json -------------------------------------------------------------------------


rule export_wiki_excerpt:
    output:
        train=f"{DATA_ROOT}/wiki_excerpt/train.npz",
        valid=f"{DATA_ROOT}/wiki_excerpt/valid.npz",
        test=f"{DATA_ROOT}/wiki_excerpt/test.npz",
        vocab=f"{DATA_ROOT}/wiki_excerpt/vocab.txt",
        meta=f"{DATA_ROOT}/wiki_excerpt/meta.json",
    log:
        "logs/export_wiki_excerpt.log",
    benchmark:
        "benchmarks/rules/export_wiki_excerpt.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
        split=" ".join(str(n) for n in PARAMS["data"]["wiki_excerpt"]["split"]),
        min_count=PARAMS["data"]["wiki_excerpt"]["min_count"],
    shell:
        "python -m pipeline data wiki_excerpt --out {params.out:q} --split {params.split}"
        " --min-count {params.min_count} > {log} 2>&1"


rule download_wikitext103:
    output:
        train=f"{DATA_ROOT}/wikitext103/train.npz",
        valid=f"{DATA_ROOT}/wikitext103/valid.npz",
        test=f"{DATA_ROOT}/wikitext103/test.npz",
        vocab=f"{DATA_ROOT}/wikitext103/vocab.txt",
        meta=f"{DATA_ROOT}/wikitext103/meta.json",
    log:
        "logs/download_wikitext103.log",
    benchmark:
        "benchmarks/rules/download_wikitext103.tsv"
    localrule: True  # cluster nodes often have no internet; the login node does
    conda:
        "../../envs/pipeline.yaml"
    params:
        out=subpath(output.meta, parent=True),
        url=PARAMS["data"]["wikitext103"]["url"],
        sha256=PARAMS["data"]["wikitext103"]["sha256"],
        mirror=PARAMS["data"]["wikitext103"]["mirror"] or "",
        archive=PARAMS["data"]["wikitext103"]["archive"] or "",
        limits=download_limits(),
    shell:
        "python -m pipeline data wikitext103 --out {params.out:q} --url {params.url:q}"
        " --sha256 {params.sha256} --mirror={params.mirror:q} --archive={params.archive:q}"
        " {params.limits} > {log} 2>&1"
