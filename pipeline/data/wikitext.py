"""Word-level language-modelling corpora: WikiText-103 and the offline Wikipedia excerpt.

Both are exported to one layout, ``data/<name>/``::

    train.npz, valid.npz, test.npz   tokens int32 (N,): the split as one stream of ids
    vocab.txt                        one symbol per line; line i is id i
    meta.json                        {name, num_types, tokens {split: N}, unk_fraction,
                                      source, sha256 {source, *.npz, vocab.txt}, ...}

Tokenized as the official DEQ-Sequence code (Transformer-XL's ``Vocab``, which DEQ
inherits): each line is split on whitespace, case kept, and ``<eos>`` appended to every
line, blank lines included. The vocabulary is ``<eos>`` (the one special symbol, id 0)
then the training split's symbols in descending frequency, ties in first-seen order as
``Counter.most_common`` returns them; the adaptive-softmax cutoffs depend on that order.

* ``wikitext103``: ``wikitext-103-v1.zip`` (fetched and sha256-checked through
  :func:`pipeline.data.download.fetch`, or a local copy), files
  ``wikitext-103/wiki.{train,valid,test}.tokens``. The official archive must give
  267,735 types (:data:`WT103_TYPES`); another archive carries its own digest.
* ``wiki_excerpt`` (the offline default): the English Wikipedia excerpt shipped in the
  gensim 4.4.0 wheel (``gensim/test/test_data/...-shortened.bz2``), read through
  ``importlib.resources`` and sha256-checked. gensim's ``extract_pages`` and
  ``filter_wiki`` give its article texts; redirects and empty pages are dropped (106
  articles). Each line is cut into words and single punctuation marks (``\\w+`` or one
  non-space, non-word character), as WikiText's text is tokenized; the articles are split
  in file order 95 / 5 / 6 into ``wiki.{train,valid,test}.tokens``; as WikiText was built,
  a word seen fewer than 3 times in train becomes ``<unk>`` (in every split). Then the
  same tokenizer as WikiText-103. Measured: 655,634 tokens with ``<eos>``, 42,446 types
  (42,445 words plus ``<eos>``) before ``<unk>``; 14,185 types after, 10.3% ``<unk>`` in
  valid. Sources and licences: the text is Wikipedia's (CC BY-SA), the file is gensim's
  test data (gensim is LGPL-2.1).

    python -m pipeline data wiki_excerpt --out data/wiki_excerpt
    python -m pipeline data wikitext103 --out data/wikitext103 --url URL --sha256 HEX \\
        [--mirror URL] [--archive PATH]
"""
from __future__ import annotations

import array
import bz2
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.io import prune_empty_dirs

from .download import (DataError, Limits, extract_archive, fetch, file_digest, replace_dir,
                       temp_sibling, verify_checksum)
from .layout import save_npz

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"

WT103_URL = "https://wikitext.smerity.com/wikitext-103-v1.zip"
WT103_SHA256 = "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"
WT103_FOLDER = "wikitext-103"
WT103_TYPES = 267_735          # the official vocabulary size (Transformer-XL, DEQ)

EXCERPT_PACKAGE = "gensim"
EXCERPT_RESOURCE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EXCERPT_BYTES = 1_695_871
EXCERPT_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
EXCERPT_SPLIT = (95, 5, 6)     # articles, in file order
EXCERPT_MIN_COUNT = 3          # rarer training words become <unk>, as in WikiText
HINT = ("To get WikiText-103 another way: set data.wikitext103.mirror in params.yaml to a "
        "second URL, or data.wikitext103.archive to a local copy of wikitext-103-v1.zip, or "
        "restore data/wikitext103 with `dvc pull` (see docs/data.md).")


# --- the official tokenizer -------------------------------------------------------------------

def tokenize_line(line: str) -> list[str]:
    """One line as the official ``Vocab.tokenize``: strip, split on whitespace, ``<eos>``."""
    return line.strip().split() + [EOS]


def count_file(path: str | Path) -> Counter:
    """Symbol counts of a ``.tokens`` file (every line with its ``<eos>``)."""
    counter: Counter = Counter()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            counter.update(tokenize_line(line))
    return counter


def build_vocab(counter: Counter) -> list[str]:
    """``<eos>`` first (the official special symbol), then by descending count, ties in the
    order ``Counter.most_common`` gives (first seen first)."""
    return [EOS] + [sym for sym, _ in counter.most_common() if sym != EOS]


def encode_file(path: str | Path, index: dict[str, int]) -> np.ndarray:
    """A ``.tokens`` file as int32 ids; a symbol outside the vocabulary is an error (the
    official code asserts the same: every WikiText symbol is in train)."""
    ids = array.array("i")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                ids.extend(index[sym] for sym in tokenize_line(line))
            except KeyError as err:
                raise DataError(f"{path}:{number}: symbol {err.args[0]!r} is not in the "
                                "training vocabulary") from None
    return np.frombuffer(ids, dtype=np.int32).copy()


def write_corpus(out_dir: str | Path, folder: Path, *, name: str, source: str,
                 source_sha256: str, expect_types: int | None = None, extra: dict | None = None
                 ) -> dict:
    """Tokenize ``folder/wiki.{train,valid,test}.tokens`` and write the layout atomically.
    ``expect_types``: refuse (before writing) a vocabulary of any other size."""
    out_dir = Path(out_dir)
    files = {s: folder / f"wiki.{s}.tokens" for s in SPLITS}
    for split, path in files.items():
        if not path.is_file():
            raise DataError(f"{path}: missing; expected wiki.{{train,valid,test}}.tokens")
    vocab = build_vocab(count_file(files["train"]))
    if expect_types is not None and len(vocab) != expect_types:
        raise DataError(f"{name}: {len(vocab):,} types in train, expected {expect_types:,}; "
                        "is the archive the official one? (set --no-expect for another)")
    index = {sym: i for i, sym in enumerate(vocab)}
    streams = {s: encode_file(p, index) for s, p in files.items()}
    unk = index.get(UNK)
    meta = {"name": name, "num_types": len(vocab),
            "tokens": {s: int(len(a)) for s, a in streams.items()},
            "unk_fraction": {s: (float(np.mean(a == unk)) if unk is not None and len(a) else 0.0)
                             for s, a in streams.items()},
            "tokenizer": "whitespace split, <eos> after every line, vocabulary <eos> then "
                         "train symbols by descending count (Counter.most_common)",
            "source": source, "sha256": {"source": source_sha256}, "counts_checked":
            expect_types is not None, **(extra or {})}
    prune_empty_dirs(out_dir)
    with temp_sibling(out_dir, directory=True) as tmp:
        for split, tokens in streams.items():
            save_npz(tmp / f"{split}.npz", tokens=tokens)
            meta["sha256"][f"{split}.npz"] = file_digest(tmp / f"{split}.npz", "sha256")
        (tmp / "vocab.txt").write_text("".join(f"{sym}\n" for sym in vocab), encoding="utf-8")
        meta["sha256"]["vocab.txt"] = file_digest(tmp / "vocab.txt", "sha256")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    print(f"{name}: {len(vocab):,} types, tokens {meta['tokens']} -> {out_dir}")
    return meta


def load_corpus(data_dir: str | Path) -> tuple[dict, list[str], dict[str, np.ndarray]]:
    """(meta, vocab, {split: int32 tokens}) of an exported corpus (``allow_pickle=False``)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: no meta.json. Create it with `snakemake --cores all "
                        f"{meta_path}` (see docs/data.md)")
    meta = json.loads(meta_path.read_text())
    vocab = (data_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    streams = {}
    for split in SPLITS:
        with np.load(data_dir / f"{split}.npz", allow_pickle=False) as npz:
            streams[split] = npz["tokens"]
    if len(vocab) != meta["num_types"]:
        raise DataError(f"{data_dir}: vocab.txt has {len(vocab)} symbols, meta.json says "
                        f"{meta['num_types']}")
    return meta, vocab, streams


# --- WikiText-103 -----------------------------------------------------------------------------

def prepare_wikitext103(out_dir: str | Path, *, url: str, sha256: str, mirror: str | None = None,
                        archive: str | Path | None = None, limits: Limits = Limits(),
                        expect: bool | None = None) -> dict:
    """Obtain, verify and export WikiText-103 to ``out_dir``. ``expect``: check the official
    type count (default: when ``sha256`` is the official archive's)."""
    out_dir = Path(out_dir)
    expect = sha256 == WT103_SHA256 if expect is None else expect
    prune_empty_dirs(out_dir)
    try:
        with temp_sibling(out_dir, directory=True) as work:
            if archive:
                path = Path(archive)
                verify_checksum(path, ("sha256", sha256))
                print(f"wikitext103: using local archive {path} (sha256 ok)")
            else:
                path = fetch([url, mirror or ""], work / "wikitext-103-v1.zip",
                             ("sha256", sha256), limits=limits)
            folder = extract_archive(path, work / "extracted") / WT103_FOLDER
            if not folder.is_dir():
                raise DataError(f"{path}: no {WT103_FOLDER}/ inside; is it wikitext-103-v1.zip?")
            return write_corpus(out_dir, folder, name="wikitext103",
                                source=f"wikitext-103-v1.zip (sha256 {sha256})",
                                source_sha256=sha256,
                                expect_types=WT103_TYPES if expect else None)
    except DataError as err:
        raise DataError(f"{err}\n{HINT}") from err


# --- the gensim excerpt -----------------------------------------------------------------------

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def excerpt_bytes() -> bytes:
    """The excerpt from the installed gensim wheel, checked against its pinned sha256."""
    from importlib import resources
    try:
        blob = (resources.files(EXCERPT_PACKAGE) / EXCERPT_RESOURCE).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DataError(f"the Wikipedia excerpt ships in gensim 4.4.0 ({EXCERPT_RESOURCE}); "
                        f"install it with `pip install gensim==4.4.0` ({err})") from err
    digest = hashlib.sha256(blob).hexdigest()
    if digest != EXCERPT_SHA256 or len(blob) != EXCERPT_BYTES:
        raise DataError(f"gensim's {EXCERPT_RESOURCE}: {len(blob):,} bytes, sha256 {digest}; "
                        f"expected {EXCERPT_BYTES:,} bytes, sha256 {EXCERPT_SHA256} "
                        "(is gensim 4.4.0 installed?)")
    return blob


def excerpt_articles(blob: bytes) -> list[tuple[str, str]]:
    """(title, plain text) of each article: gensim's ``extract_pages`` (main namespace) and
    ``filter_wiki``; redirects and pages left empty by the filter are dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    articles = []
    for title, text, _ in extract_pages(bz2.open(io.BytesIO(blob)), filter_namespaces=("0",)):
        if text.lstrip().lower().startswith("#redirect"):
            continue
        plain = filter_wiki(text)
        if plain.strip():
            articles.append((title, plain))
    return articles


def wikitext_lines(text: str) -> list[str]:
    """An article's lines with words and punctuation marks separated by single spaces."""
    return [" ".join(_WORD_OR_MARK.findall(line)) for line in text.split("\n")]


def replace_rare(splits: dict[str, list[str]], min_count: int) -> dict[str, list[str]]:
    """Every word seen fewer than ``min_count`` times in train becomes ``<unk>``."""
    counts = Counter(w for line in splits["train"] for w in line.split())
    keep = {w for w, c in counts.items() if c >= min_count}
    return {s: [" ".join(w if w in keep else UNK for w in line.split()) for line in lines]
            for s, lines in splits.items()}


def export_excerpt(out_dir: str | Path, *, split: Iterable[int] = EXCERPT_SPLIT,
                   min_count: int = EXCERPT_MIN_COUNT, blob: bytes | None = None) -> dict:
    """Export the gensim Wikipedia excerpt in the WikiText layout (see the module docstring).
    ``blob``: the bz2 dump itself (tests); by default the checked file from gensim."""
    split = tuple(int(n) for n in split)
    blob = excerpt_bytes() if blob is None else blob
    articles = excerpt_articles(blob)
    if len(split) != 3 or min(split) < 1 or sum(split) != len(articles):
        raise DataError(f"article split {list(split)} must be 3 positive counts summing to the "
                        f"{len(articles)} articles of the excerpt")
    bounds = np.cumsum((0,) + split)
    lines = {s: [line for _, text in articles[bounds[i]:bounds[i + 1]]
                 for line in wikitext_lines(text)] for i, s in enumerate(SPLITS)}
    lines = replace_rare(lines, min_count)
    out_dir = Path(out_dir)
    with temp_sibling(out_dir, directory=True) as work:
        for s in SPLITS:
            (work / f"wiki.{s}.tokens").write_text("".join(f"{line}\n" for line in lines[s]),
                                                   encoding="utf-8")
        return write_corpus(out_dir, work, name="wiki_excerpt",
                            source=f"gensim 4.4.0 {EXCERPT_RESOURCE} (sha256 "
                                   f"{hashlib.sha256(blob).hexdigest()}); Wikipedia text, "
                                   "CC BY-SA; gensim LGPL-2.1",
                            source_sha256=hashlib.sha256(blob).hexdigest(),
                            extra={"articles": {s: n for s, n in zip(SPLITS, split)},
                                   "min_count": min_count})

