"""``python -m pipeline data <dataset> ...``: the commands the data rules run.

    python -m pipeline data digits   --out data/digits --test-fraction 0.2 --seed 0
    python -m pipeline data cifar10  --out data/cifar10 --url URL --md5 MD5 \
        [--mirror URL] [--archive PATH]
    python -m pipeline data imagenet --root DIR --manifest data/imagenet/manifest.json

A :class:`~pipeline.data.download.DataError` ends the command with exit status 1
and its message (what went wrong and what to do), without a traceback.
"""
from __future__ import annotations

import sys

from .download import DataError


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{digits,cifar10,imagenet}")

    p = sub.add_parser("digits", help="export scikit-learn's digits (offline, the default)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/digits")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")

    p = sub.add_parser("cifar10", help="download, verify and export CIFAR-10")
    p.add_argument("--out", required=True, help="output folder, e.g. data/cifar10")
    p.add_argument("--url", required=True, help="URL of cifar-10-python.tar.gz")
    p.add_argument("--md5", required=True, help="md5 of the archive")
    p.add_argument("--mirror", default="", help="second URL, tried after --url")
    p.add_argument("--archive", default="", help="local copy of the archive (no download)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per socket operation")

    p = sub.add_parser("imagenet", help="validate an ImageFolder tree, write its manifest")
    p.add_argument("--root", default="", help="folder with train/ and val/ class sub-folders")
    p.add_argument("--manifest", required=True,
                   help="output JSON, e.g. data/imagenet/manifest.json")


def main(args) -> int:
    try:
        if args.dataset == "digits":
            from .digits import export_digits
            export_digits(args.out, test_fraction=args.test_fraction, seed=args.seed)
        elif args.dataset == "cifar10":
            from .cifar10 import prepare_cifar10
            prepare_cifar10(args.out, url=args.url, md5=args.md5, mirror=args.mirror or None,
                            archive=args.archive or None, timeout=args.timeout)
        else:
            from .imagenet import validate_imagenet
            validate_imagenet(args.root or None, args.manifest)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
