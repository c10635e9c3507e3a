"""Tasks ``graph`` and ``node``: IGNN on the graph layout of :mod:`pipeline.data.graphs`.

``graph`` (COX2, PROTEINS, MUTAG): graph classification, cross-entropy, accuracy, k-fold
cross-validation. ``data:`` keys: ``dataset``, ``protocol``, ``folds``, ``fold_seed``,
``val_fraction`` and ``fold`` (set per fold by ``python -m pipeline train-repeats``).

* protocol ``official`` (IGNN's, the paper's): train on 9 folds, evaluate the held-out
  fold after every epoch, report the best test accuracy over epochs (selected on test).
* protocol ``clean``: the same folds; a stratified ``val_fraction`` of the training folds
  is held out for validation; report the test accuracy at the best validation epoch.

The folds are ``StratifiedKFold(folds, shuffle=True, random_state=fold_seed)`` on the
graphs in file order with their own labels: truly stratified. (The official script
shuffles the dataset first and then stratifies with the labels of the unshuffled order,
so its folds are not stratified; that defect is listed, not reproduced.)

``node`` (PPI, chains): node classification, micro-F1 (the official PPI ``f1_score(...,
average='micro')`` on ``logits > 0``; for single-label chains on the one-hot argmax, which
equals accuracy). PPI: BCE with logits, one training graph per step, the 2 validation and
2 test graphs evaluated together. Chains: cross-entropy on the 20 training nodes, one
step per epoch on the whole graph. ``data:`` keys ``dataset`` and ``seeds`` (runs with
seeds ``seed, seed+1, ...``). Every evaluation scores the validation and the test split,
so one run gives both protocols: the best test F1 over epochs (official, the paper's best
of three runs) and the test F1 at the best validation epoch (clean).

A batch is one block-diagonal sparse adjacency (``adj_t`` = A^T, what the model
multiplies by) with ``lambda_pf`` its Perron-Frobenius eigenvalue: exactly 1 for the
symmetric (D+I)^-1/2 (A+I) (D+I)^-1/2 of the graph datasets (the official code hard-codes
it), an eigen-solve per graph otherwise (PPI's raw 0/1 adjacency, the directed chains).
The adjacency is (D+I)^-1/2 (A+I) (D+I)^-1/2 in training and evaluation alike (the official
graph test path normalises 2A+I: a listed deviation, not reproduced).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn

from pipeline.deq import EstimatorConfig, SolverConfig
from pipeline.experiments.sampling import epoch_order

Tensor = torch.Tensor

PROTOCOLS = ("official", "clean")
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


# --- adjacency ----------------------------------------------------------------------------

def normalized_edges(edges: np.ndarray, num_nodes: int, adjacency: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(edges with self-loops, weights) of the adjacency the model uses, sorted by
    (src, dst). ``aug_normalized``: (D+I)^-1/2 (A+I) (D+I)^-1/2 with D the row sums of A
    (the official ``aug_normalized_adjacency``); ``raw``: A itself (PPI)."""
    if adjacency == "raw":
        return edges, np.ones(edges.shape[1])
    if adjacency != "aug_normalized":
        raise ValueError(f"adjacency {adjacency!r}; expected 'aug_normalized' or 'raw'")
    loops = np.arange(num_nodes)
    full = np.concatenate([edges, np.stack([loops, loops])], axis=1)
    order = np.lexsort((full[1], full[0]))
    full = full[:, order]
    degree = np.bincount(full[0], minlength=num_nodes).astype(np.float64)
    inv_sqrt = 1.0 / np.sqrt(degree)
    return full, inv_sqrt[full[0]] * inv_sqrt[full[1]]


def perron_frobenius(edges: np.ndarray, weights: np.ndarray, num_nodes: int) -> float:
    """The largest |eigenvalue| of a nonnegative sparse matrix (the official
    ``get_spectral_rad``, without its +1e-5): eigsh when symmetric, a dense solve for
    small non-symmetric ones, ARPACK's eigs otherwise."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla
    a = sp.csr_matrix((np.abs(weights), (edges[0], edges[1])), shape=(num_nodes, num_nodes))
    if num_nodes <= 2:
        return float(np.abs(np.linalg.eigvals(a.toarray())).max())
    if (a != a.T).nnz == 0:
        return float(sla.eigsh(a, k=1, which="LA", return_eigenvectors=False)[0])
    if num_nodes <= 1500:
        return float(np.abs(np.linalg.eigvals(a.toarray())).max())
    return float(np.abs(sla.eigs(a, k=1, which="LM", return_eigenvectors=False)[0]))


class GraphStore:
    """A graph dataset in memory, able to cut a block-diagonal batch of any graphs."""

    def __init__(self, data_dir: str | Path, dataset: str | None):
        from pipeline.data.graphs import load_graphs
        self.meta, arrays = load_graphs(data_dir)
        if dataset and self.meta["name"] != dataset:
            raise ValueError(f"--data {data_dir} holds {self.meta['name']!r}, but the run's "
                             f"dataset is {dataset!r}")
        self.node_graph = arrays["node_graph"]
        n = len(self.node_graph)
        self.edges, self.weights = normalized_edges(arrays["edges"], n, self.meta["adjacency"])
        self.edge_graph = self.node_graph[self.edges[0]]
        self.features = torch.from_numpy(arrays["features"])
        self.targets = torch.from_numpy(arrays["targets"])
        self.split = arrays["split"]
        self.num_graphs = self.meta["num_graphs"]
        self.node_start = np.searchsorted(self.node_graph, np.arange(self.num_graphs + 1))
        self.edge_start = np.searchsorted(self.edge_graph, np.arange(self.num_graphs + 1))
        self.symmetric_normalized = (self.meta["adjacency"] == "aug_normalized"
                                     and self.meta["kind"] == "graph")
        self._lambda: dict[int, float] = {}

    def lambda_pf(self, g: int) -> float:
        """lambda_pf of graph g's adjacency: 1 for a symmetric normalised one."""
        if self.symmetric_normalized:
            return 1.0
        if g not in self._lambda:
            n0, n1 = self.node_start[g], self.node_start[g + 1]
            e0, e1 = self.edge_start[g], self.edge_start[g + 1]
            self._lambda[g] = perron_frobenius(self.edges[:, e0:e1] - n0, self.weights[e0:e1],
                                               n1 - n0)
        return self._lambda[g]

    def batch(self, graphs, device: str) -> dict:
        """Graphs ``graphs`` (indices) as one block-diagonal batch."""
        graphs = np.asarray(graphs, dtype=np.int64)
        sizes = self.node_start[graphs + 1] - self.node_start[graphs]
        new_start = np.concatenate([[0], np.cumsum(sizes)])
        nodes = np.concatenate([np.arange(self.node_start[g], self.node_start[g + 1])
                                for g in graphs])
        edge_idx = np.concatenate([np.arange(self.edge_start[g], self.edge_start[g + 1])
                                   for g in graphs])
        relabel = np.full(len(self.node_graph), -1, dtype=np.int64)
        relabel[nodes] = np.arange(len(nodes))
        src, dst = relabel[self.edges[0, edge_idx]], relabel[self.edges[1, edge_idx]]
        n = int(new_start[-1])
        # A^T: entry (dst, src), what X A = (A^T X^T)^T multiplies by
        adj_t = torch.sparse_coo_tensor(torch.from_numpy(np.stack([dst, src])),
                                        torch.from_numpy(self.weights[edge_idx]).float(),
                                        (n, n), check_invariants=False).coalesce()
        graph = np.repeat(np.arange(len(graphs)), sizes)
        return {"x": self.features[nodes].to(device), "adj_t": adj_t.to(device),
                "lambda_pf": max(self.lambda_pf(int(g)) for g in graphs),
                "graph": torch.from_numpy(graph).to(device), "num_graphs": len(graphs),
                "nodes": torch.from_numpy(nodes).to(device)}


def micro_f1(logits: Tensor, targets: Tensor) -> float:
    """Micro-F1 as the official PPI ``test``: predictions ``logits > 0`` against 0/1 targets
    (multi-label), or the one-hot argmax against one-hot classes (single-label); 0 when
    nothing is predicted."""
    if targets.ndim == 1:
        pred = Fn.one_hot(logits.argmax(1), logits.shape[1]).bool()
        true = Fn.one_hot(targets, logits.shape[1]).bool()
    else:
        pred, true = logits > 0, targets > 0.5
    tp = (pred & true).sum().item()
    fp = (pred & ~true).sum().item()
    fn = (~pred & true).sum().item()
    if pred.sum().item() == 0:
        return 0.0
    return 2 * tp / (2 * tp + fp + fn)


class _IGNNTask:
    """What ``graph`` and ``node`` share: the store, the model, no pretraining."""

    readout = "graph"

    def __init__(self, model: dict, data: dict, data_dir: str | Path, device: str,
                 batch_size: int, eval_batch_size: int, seed: int):
        from pipeline.models.ignn import IGNNConfig
        self.device, self.batch_size, self.eval_batch_size = device, batch_size, eval_batch_size
        self.seed = seed
        self.data_params = dict(data)
        self.store = GraphStore(data_dir, data.get("dataset"))
        meta = self.store.meta
        if meta["kind"] != self.readout:
            raise ValueError(f"--data {data_dir} is a {meta['kind']} dataset ({meta['name']}); "
                             f"the {self.name!r} task needs a {self.readout} dataset")
        self.dataset = meta["name"]
        self.model_config = IGNNConfig.from_params(model, in_features=meta["num_features"],
                                                   num_classes=meta["num_classes"],
                                                   readout=self.readout)
        self._eval_cache: dict[str, list] = {}

    def build_model(self) -> nn.Module:
        from pipeline.models.ignn import IGNN
        return IGNN(self.model_config).to(self.device)

    def pretrain_estimator(self, model) -> EstimatorConfig:
        raise ValueError(f"the {self.name!r} task has no pretraining stage; set "
                         "pretrain_steps: 0")

    def _eval_batches(self, split: str) -> list:
        if split not in self._eval_cache:
            self._eval_cache[split] = list(self._split_batches(split))
        return self._eval_cache[split]


def _check_keys(task: str, data: dict, valid: set) -> None:
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown {task} data keys {unknown}; valid keys: {sorted(valid)}")


class GraphTask(_IGNNTask):
    """Graph classification with IGNN (appendix §4.3; see the module docstring)."""

    name = "graph"
    readout = "graph"
    higher_is_better = True
    DATA_KEYS = {"dataset", "protocol", "folds", "fold_seed", "val_fraction", "fold"}

    def __init__(self, model: dict, data: dict, data_dir, device, batch_size, eval_batch_size,
                 seed):
        _check_keys("graph", data, self.DATA_KEYS)
        super().__init__(model, data, data_dir, device, batch_size, eval_batch_size, seed)
        self.protocol = data.get("protocol", "official")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}; valid: {list(PROTOCOLS)}")
        folds, fold = int(data.get("folds", 10)), int(data.get("fold", 0))
        if not 0 <= fold < folds:
            raise ValueError(f"fold {fold} is not in 0..{folds - 1}")
        self.splits = graph_folds(self.store.targets.numpy(), folds, fold,
                                  int(data.get("fold_seed", 42)), self.protocol,
                                  float(data.get("val_fraction", 0.1)))
        self.primary_metric = "acc" if self.protocol == "official" else "val_acc"
        self.eval_split = "test" if self.protocol == "official" else "valid"

    @staticmethod
    def repeats(data: dict, seed: int) -> list[tuple[str, dict, int]]:
        """One unit per fold: (label, data overrides, seed)."""
        return [(f"fold{k}", {"fold": k}, seed) for k in range(int(data.get("folds", 10)))]

    def steps_per_epoch(self, world_size: int = 1) -> int:
        # every graph every epoch: the last batch may be partial (the official DataLoader)
        return math.ceil(len(self.splits["train"]) / (self.batch_size * world_size))

    def batches(self, split: str, epoch: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[dict]:
        if split != "train":
            yield from self._eval_batches(split)
            return
        idx = self.splits["train"]
        order = idx[epoch_order(len(idx), self.seed, epoch).numpy()]
        step = self.batch_size * world_size
        for i in range(0, len(order), step):
            yield self._labelled(order[i + rank * self.batch_size:
                                       i + (rank + 1) * self.batch_size])

    def _labelled(self, graphs) -> dict:
        batch = self.store.batch(graphs, self.device)
        batch["y"] = self.store.targets[torch.from_numpy(np.asarray(graphs))].to(self.device)
        return batch

    def _split_batches(self, split: str):
        idx = self.splits[split]
        for i in range(0, len(idx), self.eval_batch_size):
            yield self._labelled(idx[i:i + self.eval_batch_size])

    def loss(self, model, batch, solver: SolverConfig, estimator: EstimatorConfig
             ) -> tuple[Tensor, dict[str, float]]:
        logits, _ = model(batch, solver, estimator)
        loss = Fn.cross_entropy(logits, batch["y"])
        return loss, {"acc": (logits.argmax(1) == batch["y"]).float().mean().item()}

    @torch.no_grad()
    def _accuracy(self, model, split, solver, estimator) -> float:
        correct = total = 0
        for batch in self._eval_batches(split):
            logits, _ = model(batch, solver, estimator)
            correct += (logits.argmax(1) == batch["y"]).sum().item()
            total += len(batch["y"])
        return correct / total

    def evaluate(self, model, solver: SolverConfig, estimator: EstimatorConfig,
                 split: str | None = None) -> dict[str, float]:
        """Test accuracy (``acc``) and, in the clean protocol, validation accuracy
        (``val_acc``), in eval mode."""
        was_training = model.training
        model.eval()
        out = {"acc": self._accuracy(model, "test", solver, estimator)}
        if self.protocol == "clean":
            out["val_acc"] = self._accuracy(model, "valid", solver, estimator)
        model.train(was_training)
        return out


def graph_folds(labels: np.ndarray, folds: int, fold: int, fold_seed: int, protocol: str,
                val_fraction: float) -> dict[str, np.ndarray]:
    """Graph indices of train / valid / test for one fold (see the module docstring)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=fold_seed)
    train, test = list(skf.split(np.zeros(len(labels)), labels))[fold]
    out = {"test": np.sort(test), "valid": np.array([], dtype=np.int64)}
    if protocol == "clean":
        train, valid = train_test_split(train, test_size=val_fraction, stratify=labels[train],
                                        random_state=fold_seed + fold)
        out["valid"] = np.sort(valid)
    out["train"] = np.sort(train)
    return out


class NodeTask(_IGNNTask):
    """Node classification with IGNN: PPI (multi-label) and chains (see the module docstring)."""

    name = "node"
    readout = "node"
    higher_is_better = True
    primary_metric = "f1"
    eval_split = "test"
    DATA_KEYS = {"dataset", "seeds"}

    def __init__(self, model: dict, data: dict, data_dir, device, batch_size, eval_batch_size,
                 seed):
        _check_keys("node", data, self.DATA_KEYS)
        super().__init__(model, data, data_dir, device, batch_size, eval_batch_size, seed)
        store = self.store
        self.multilabel = bool(store.meta["multilabel"])
        self.per_graph_split = len(store.split) == store.num_graphs and store.num_graphs > 1
        if self.per_graph_split:   # PPI: whole graphs per split
            self.graphs = {s: np.flatnonzero(store.split == c) for s, c in SPLIT_CODES.items()}
        else:                      # chains: one graph, a node mask per split
            self.graphs = {s: np.arange(store.num_graphs) for s in SPLIT_CODES}
        if not len(self.graphs["train"]):
            raise ValueError(f"{self.dataset}: no training graphs")

    @staticmethod
    def repeats(data: dict, seed: int) -> list[tuple[str, dict, int]]:
        """One unit per seed: seed, seed + 1, ..."""
        return [(f"seed{s}", {}, seed + s) for s in range(int(data.get("seeds", 1)))]

    def steps_per_epoch(self, world_size: int = 1) -> int:
        if not self.per_graph_split:
            return 1
        return math.ceil(len(self.graphs["train"]) / (self.batch_size * world_size))

    def _labelled(self, graphs, split: str) -> dict:
        batch = self.store.batch(graphs, self.device)
        nodes = batch["nodes"].cpu()
        if self.per_graph_split:
            mask = torch.ones(len(nodes), dtype=torch.bool)
        else:
            mask = torch.from_numpy(self.store.split[nodes.numpy()] == SPLIT_CODES[split])
        batch["mask"] = mask.to(self.device)
        batch["y"] = self.store.targets[nodes][mask].to(self.device)
        return batch

    def batches(self, split: str, epoch: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[dict]:
        if split != "train":
            yield from self._eval_batches(split)
            return
        graphs = self.graphs["train"]
        if not self.per_graph_split:
            if "train" not in self._eval_cache:
                self._eval_cache["train"] = [self._labelled(graphs, "train")]
            yield from self._eval_cache["train"]
            return
        order = graphs[epoch_order(len(graphs), self.seed, epoch).numpy()]
        step = self.batch_size * world_size
        for i in range(0, len(order), step):
            yield self._labelled(order[i + rank * self.batch_size:
                                       i + (rank + 1) * self.batch_size], "train")

    def _split_batches(self, split: str):
        graphs = self.graphs[split]
        for i in range(0, len(graphs), self.eval_batch_size):
            yield self._labelled(graphs[i:i + self.eval_batch_size], split)

    def loss(self, model, batch, solver: SolverConfig, estimator: EstimatorConfig
             ) -> tuple[Tensor, dict[str, float]]:
        logits, _ = model(batch, solver, estimator)
        logits = logits[batch["mask"]]
        if self.multilabel:
            loss = Fn.binary_cross_entropy_with_logits(logits, batch["y"])
        else:
            loss = Fn.cross_entropy(logits, batch["y"])
        return loss, {"f1": micro_f1(logits.detach(), batch["y"])}

    @torch.no_grad()
    def _f1(self, model, split, solver, estimator) -> float:
        logits, targets = [], []
        for batch in self._eval_batches(split):
            out, _ = model(batch, solver, estimator)
            logits.append(out[batch["mask"]])
            targets.append(batch["y"])
        return micro_f1(torch.cat(logits), torch.cat(targets))

    def evaluate(self, model, solver: SolverConfig, estimator: EstimatorConfig,
                 split: str | None = None) -> dict[str, float]:
        """Test micro-F1 (``f1``) and validation micro-F1 (``val_f1``), in eval mode."""
        was_training = model.training
        model.eval()
        out = {"f1": self._f1(model, "test", solver, estimator),
               "val_f1": self._f1(model, "valid", solver, estimator)}
        model.train(was_training)
        return out
