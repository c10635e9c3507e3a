"""Datasets: download, verify, export to one layout, and load.

Every image dataset is exported to ``data/<name>/{train.npz, test.npz, meta.json}``
(see :mod:`pipeline.data.layout`); training reads it through :func:`load_split`:

>>> from pipeline.data import load_meta, load_split
>>> images, labels = load_split("data/digits", "train")     # doctest: +SKIP
>>> load_meta("data/digits")["image_shape"]                  # doctest: +SKIP
[8, 8, 1]

Modules, one per dataset, all downloading through :mod:`pipeline.data.download`:
``digits`` (embedded default, offline), ``cifar10`` (official archive, md5-checked),
``imagenet`` (user-provided ImageFolder tree, validated; manifest only), ``graphs``
(TU, PPI, MUTAG, chains) and ``wikitext`` (WikiText-103, and gensim's Wikipedia excerpt
as the offline language-modelling default).
The command line is ``python -m pipeline data {digits,cifar10,imagenet} ...``.
"""
from .download import DataError, extract_archive, fetch
from .layout import dataset_digest, load_meta, load_split

__all__ = ["DataError", "dataset_digest", "extract_archive", "fetch", "load_meta", "load_split"]
