"""Language-modelling corpora (pipeline/data/wikitext.py): the official tokenizer, the gensim
Wikipedia excerpt (the offline default), and a tiny zip in the true WikiText-103 layout
fetched, verified and tokenized from 127.0.0.1 by the real code and the real Snakemake rule."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import serve_folder
from pipeline.data import DataError
from pipeline.data import wikitext as wt

# WikiText's own shape: " = Title = " headings, blank lines between paragraphs, tokens
# separated by spaces, <unk> already in the text, "@-@" for hyphens.
TRAIN = (" \n = Valkyria Chronicles = \n \n the game is a role @-@ playing game . \n"
         " the game was released in Japan . \n \n = = Gameplay = = \n"
         " the player moves <unk> units . \n the tower is tall . \n")
VALID = " \n = tower = \n the tower is tall . \n"
TEST = " \n the game was tall . \n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wikitext_zip(tmp_path_factory):
    """(base URL, served folder): wikitext-103-v1.zip in the true layout, and a corrupt copy."""
    root = tmp_path_factory.mktemp("www")
    with zipfile.ZipFile(root / "wikitext-103-v1.zip", "w") as zf:
        for split, text in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
            zf.writestr(f"{wt.WT103_FOLDER}/wiki.{split}.tokens", text)
    blob = (root / "wikitext-103-v1.zip").read_bytes()
    (root / "corrupt.zip").write_bytes(blob[:50] + bytes([blob[50] ^ 0xFF]) + blob[51:])
    with serve_folder(root) as base:
        yield base, root


# --- the official tokenizer -------------------------------------------------------------------

def test_tokenizer_appends_eos_to_every_line_and_orders_the_vocabulary_by_count(tmp_path):
    path = tmp_path / "wiki.train.tokens"
    path.write_text("b a\n\n  c b  \n")
    counts = wt.count_file(path)
    assert counts == Counter({"<eos>": 3, "b": 2, "a": 1, "c": 1})  # the blank line's <eos> too
    # <eos> first; then by count, the tie a / c in first-seen order (Counter.most_common)
    assert wt.build_vocab(counts) == ["<eos>", "b", "a", "c"]
    index = {s: i for i, s in enumerate(wt.build_vocab(counts))}
    ids = wt.encode_file(path, index)
    assert ids.dtype == np.int32 and ids.tolist() == [1, 2, 0, 0, 3, 1, 0]
    path.write_text("b d\n")
    with pytest.raises(DataError, match="'d' is not in the training vocabulary"):
        wt.encode_file(path, index)


# --- the gensim excerpt -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def excerpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "wiki_excerpt"
    return out, wt.export_excerpt(out)


def test_excerpt_is_the_pinned_gensim_file():
    blob = wt.excerpt_bytes()
    assert len(blob) == wt.EXCERPT_BYTES == 1_695_871
    assert hashlib.sha256(blob).hexdigest() == wt.EXCERPT_SHA256


def test_a_different_excerpt_file_is_refused(monkeypatch):
    monkeypatch.setattr(wt, "EXCERPT_SHA256", "0" * 64)
    with pytest.raises(DataError, match="expected 1,695,871 bytes, sha256 0000"):
        wt.excerpt_bytes()


def test_excerpt_reduces_to_the_measured_articles_tokens_and_types():
    """106 articles (redirects and the empty page dropped); 655,634 tokens with <eos> and
    42,446 types (<eos> included) before the rare words become <unk>."""
    articles = wt.excerpt_articles(wt.excerpt_bytes())
    assert len(articles) == 106
    counts = Counter(tok for _, text in articles for line in wt.wikitext_lines(text)
                     for tok in wt.tokenize_line(line))
    assert sum(counts.values()) == 655_634 and len(counts) == 42_446
    assert wt.wikitext_lines("A (b), c-d.") == ["A ( b ) , c - d ."]


def test_excerpt_export_split_unk_and_layout(excerpt):
    out, meta = excerpt
    assert meta["articles"] == {"train": 95, "valid": 5, "test": 6}
    assert meta["num_types"] == 14_185 and sum(meta["tokens"].values()) == 655_634
    assert 0.09 < meta["unk_fraction"]["valid"] < 0.11          # about 10% <unk> in valid
    m, vocab, streams = wt.load_corpus(out)
    assert vocab[0] == "<eos>" and "<unk>" in vocab and len(vocab) == 14_185
    for split in wt.SPLITS:
        assert streams[split].dtype == np.int32 and len(streams[split]) == meta["tokens"][split]
        assert m["sha256"][f"{split}.npz"] == sha256(out / f"{split}.npz")
    counts = np.bincount(streams["train"], minlength=len(vocab))
    assert (np.diff(counts[1:]) <= 0).all(), "ids after <eos> are in descending train count"
    assert counts[1:].min() >= 3                 # every kept word was seen 3 times or more


def test_excerpt_export_is_byte_deterministic_and_checks_its_split(excerpt, tmp_path):
    out, meta = excerpt
    again = wt.export_excerpt(tmp_path / "again")
    assert again["sha256"] == meta["sha256"]
    with pytest.raises(DataError, match=r"article split \[95, 5, 5\] .* the 106 articles"):
        wt.export_excerpt(tmp_path / "bad", split=(95, 5, 5))
    assert not (tmp_path / "bad").exists()


# --- WikiText-103 over the loopback -----------------------------------------------------------

def test_wikitext103_zip_is_fetched_verified_and_tokenized(wikitext_zip, tmp_path):
    base, root = wikitext_zip
    digest = sha256(root / "wikitext-103-v1.zip")
    meta = wt.prepare_wikitext103(tmp_path / "wt", url=f"{base}/corrupt.zip",
                                  mirror=f"{base}/wikitext-103-v1.zip", sha256=digest)
    assert meta["sha256"]["source"] == digest and not meta["counts_checked"]
    _, vocab, streams = wt.load_corpus(tmp_path / "wt")
    train_counts = Counter(tok for line in TRAIN.split("\n")[:-1] for tok in wt.tokenize_line(line))
    assert vocab == wt.build_vocab(train_counts) and vocab[:3] == ["<eos>", "=", "the"]
    assert len(streams["train"]) == sum(train_counts.values())        # 9 lines, 9 <eos>
    assert [vocab[i] for i in streams["test"]] == ["<eos>", "the", "game", "was", "tall", ".",
                                                   "<eos>"]
    assert meta["unk_fraction"]["train"] == pytest.approx(1 / len(streams["train"]))


def test_wikitext103_wrong_digest_and_official_counts_leave_nothing(wikitext_zip, tmp_path):
    base, root = wikitext_zip
    with pytest.raises(DataError, match="sha256 is .* expected 0{64}") as err:
        wt.prepare_wikitext103(tmp_path / "wt", url=f"{base}/wikitext-103-v1.zip",
                               sha256="0" * 64)
    assert "data.wikitext103.mirror" in str(err.value)
    # the official type count is checked before anything is written
    with pytest.raises(DataError, match="types in train, expected 267,735"):
        wt.prepare_wikitext103(tmp_path / "wt", url="", archive=root / "wikitext-103-v1.zip",
                               sha256=sha256(root / "wikitext-103-v1.zip"), expect=True)
    assert list(tmp_path.iterdir()) == []


def test_snakemake_rule_download_wikitext103(wikitext_zip, tmp_path, repo_root):
    """The real rule (workflow/rules/data.smk) against the loopback server: the tiny archive
    carries its own digest; the offline excerpt rule runs beside it."""
    import yaml
    base, root = wikitext_zip
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["data"]["wikitext103"].update(url=f"{base}/wikitext-103-v1.zip", mirror=None,
                                         sha256=sha256(root / "wikitext-103-v1.zip"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "Snakefile").write_text(
        'configfile: "params.yaml"\n'
        f'include: "{repo_root}/workflow/rules/common.smk"\n'
        f'include: "{repo_root}/workflow/rules/data.smk"\n')
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--workflow-profile",
                          "none", "data/wikitext103/meta.json", "data/wiki_excerpt/meta.json"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
                         start_new_session=True)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((tmp_path / "data/wikitext103/meta.json").read_text())
    assert meta["num_types"] == len(wt.build_vocab(Counter(
        tok for line in TRAIN.split("\n")[:-1] for tok in wt.tokenize_line(line))))
    assert json.loads((tmp_path / "data/wiki_excerpt/meta.json").read_text())["num_types"] \
        == 14_185
    for rule in ("download_wikitext103", "export_wiki_excerpt"):
        assert (tmp_path / "benchmarks" / "rules" / f"{rule}.tsv").exists()
