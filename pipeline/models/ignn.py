"""IGNN: implicit graph neural networks (Gu et al., NeurIPS 2020), as the paper trains them
(appendix §4.3: "IGNN with its default architectures and settings").

Official code: SwiftieH/IGNN (commit b3c1ab3), ``layers.py`` (``ImplicitGraph``),
``graphclassification/models.py``, ``nodeclassification/models_PPI.py`` and
``models_chains.py``. One implicit layer, with node features as columns (features x nodes)::

    X = ReLU(W X A + Omega U A)                        (IGNN Eq. 2)

U (p x N) is the layer's input, A (N x N) the batch's sparse adjacency, X (m x N) the
state. Before every forward, W is projected onto the inf-norm ball of radius
kappa / lambda_pf(A) (each row onto an l1 ball, :func:`project_inf_ball`), which makes
X -> ReLU(W X A + B) a contraction in the inf-norm (IGNN Theorem 4.1, well-posedness).
The fixed point is solved from X0 = Omega U A (``h0``) by ``pipeline.deq.implicit_layer``
with the run's solver (IGNN: fixed-point iteration, 300 steps, stop on max |change| <
3e-6) and gradient estimator; the state is one sample of shape (1, m, N), so a batch of
graphs is one block-diagonal adjacency and one solve. No copy of the solver or
gradient maths lives here.

Presets (``PRESETS``) are the official architectures:

* ``graph`` (COX2, PROTEINS, MUTAG): 3 layers of width 64, kappa 0.9, sum pooling,
  Linear-ReLU-Dropout(0.5)-Linear.
* ``ppi``: 5 layers of width 256, kappa 0.98, each layer plus a linear skip of its input,
  ELU between layers, the last layer of width ``num_classes`` (official ``models_PPI``).
* ``chains``: 1 layer of width 16, kappa 0.9, each node's state L2-normalised, dropout 0.5,
  a linear map without bias (official ``models_chains``).

>>> import torch
>>> from pipeline.deq import SolverConfig, EstimatorConfig
>>> model = IGNN(IGNNConfig(in_features=3, num_classes=2))
>>> adj = torch.eye(4).to_sparse()
>>> batch = {"x": torch.randn(4, 3), "adj_t": adj, "graph": torch.tensor([0, 0, 1, 1]),
...          "num_graphs": 2, "lambda_pf": 1.0}
>>> logits, stats = model(batch, SolverConfig("fixed_point", 300, 3e-6, "inf"),
...                       EstimatorConfig("upg", k=5, lam=0.5))
>>> tuple(logits.shape)
(2, 2)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.deq import EstimatorConfig, SolverConfig, SolverStats, implicit_layer
from pipeline.models.presets import from_preset

Tensor = torch.Tensor

READOUTS = ("graph", "node")


@dataclass(frozen=True)
class IGNNConfig:
    """IGNN hyperparameters; the defaults are the official graph-classification model.

    Args:
        in_features: node feature dimension (from the dataset).
        num_classes: outputs per graph (``graph``) or per node (``node``).
        readout: ``graph`` (sum pooling and an MLP head) or ``node`` (per-node outputs);
            set by the task.
        hidden: width m of every implicit layer (official ``--hidden``: 64 graphs,
            256 PPI, 16 chains).
        num_layers: stacked implicit layers (3 graphs, 5 PPI, 1 chains).
        kappa: ||W||_inf <= kappa / lambda_pf(A) (0.9 graphs and chains, 0.98 PPI).
        dropout: dropout of the head (graphs) or of the node states (chains).
        skip: PPI's linear skips: U_{l+1} = ELU(X_l + V_l U_l), the last layer without ELU
            and of width ``num_classes``.
        normalize_nodes: L2-normalise each node's final state (official chains model).
    """

    in_features: int = 1
    num_classes: int = 2
    readout: str = "graph"
    hidden: int = 64
    num_layers: int = 3
    kappa: float = 0.9
    dropout: float = 0.5
    skip: bool = False
    normalize_nodes: bool = False

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout={self.readout!r}; expected one of {READOUTS}")
        if self.num_layers < 1 or self.hidden < 1:
            raise ValueError(f"num_layers={self.num_layers} and hidden={self.hidden} must be >= 1")
        if not 0.0 < self.kappa < 1.0:
            raise ValueError(f"kappa={self.kappa} must be in (0, 1): the well-posedness "
                             "condition of IGNN needs ||W||_inf lambda_pf(A) < 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.skip and self.readout != "node":
            raise ValueError("skip=True is the PPI node model; it needs readout='node'")

    @classmethod
    def from_params(cls, params: dict, **data_fields) -> "IGNNConfig":
        """A run's ``model:`` block: ``preset`` plus overrides; ``data_fields``
        (in_features, num_classes, readout) come from the dataset and the task."""
        return from_preset(cls, params, PRESETS, "graph", data_fields, DATA_FIELDS, "IGNN",
                           "the dataset and the task")


DATA_FIELDS = ("in_features", "num_classes", "readout")

PRESETS: dict[str, dict] = {
    # graphclassification/train_IGNN.py: --hidden 64 --kappa 0.9 --dropout 0.5
    "graph": {},
    # nodeclassification/train_IGNN_PPI.py: --hidden 256 --kappa 0.98; models_PPI has no dropout
    "ppi": {"hidden": 256, "num_layers": 5, "kappa": 0.98, "skip": True, "dropout": 0.0},
    # nodeclassification/train_IGNN_chains.py: --hidden 16 --kappa 0.9 --dropout 0.5
    "chains": {"hidden": 16, "num_layers": 1, "kappa": 0.9, "normalize_nodes": True},
}


def project_inf_ball(weight: Tensor, radius: float) -> Tensor:
    """The Euclidean projection of ``weight`` onto {W : ||W||_inf <= radius}.

    ||W||_inf is the largest row l1 norm, so the projection acts row by row: a row inside
    the l1 ball stays as it is, a row outside becomes sign(w) max(|w| - theta, 0) with the
    theta that puts it on the sphere (Duchi et al., 2008, Fig. 1: sort, cumulative sums).
    The official ``projection_norm_inf`` computes the same theta with a numpy loop on the
    CPU; this one is vectorised over rows and stays on the tensor's device. theta is
    computed in float64: in float32 the cancellation in |w| - theta leaves rows up to
    ~1e-5 past the radius when W is far outside the ball.
    """
    if radius <= 0:
        raise ValueError(f"project_inf_ball: radius={radius} must be > 0")
    dtype = weight.dtype
    weight = weight.double()
    magnitude = weight.abs()
    outside = magnitude.sum(dim=1) > radius
    if not bool(outside.any()):
        return weight.to(dtype)
    mu = magnitude.sort(dim=1, descending=True).values
    excess = mu.cumsum(dim=1) - radius                       # sum of the j largest - radius
    j = torch.arange(1, weight.shape[1] + 1, device=weight.device, dtype=weight.dtype)
    count = (mu - excess / j > 0).sum(dim=1, keepdim=True).clamp_min(1)  # support size
    theta = excess.gather(1, count - 1) / count.to(weight.dtype)
    projected = weight.sign() * (magnitude - theta).clamp_min(0.0)
    return torch.where(outside[:, None], projected, weight).to(dtype)


def sparse_right_multiply(x: Tensor, adj_t: Tensor) -> Tensor:
    """X A for a dense X (m, N) and a sparse A, given A^T: (A^T X^T)^T."""
    return torch.sparse.mm(adj_t, x.t()).t()


class ImplicitGraph(nn.Module):
    """One implicit graph layer X = ReLU(W X A + Omega U A) (official ``ImplicitGraph``).

    Parameters W (m x m) and Omega (m x p), initialised U(-1/sqrt(m), 1/sqrt(m)) as the
    official ``init`` (which uses W's column count for every parameter). The official
    layer also has a bias and an Omega_2 that its forward never uses; they are left out.
    """

    def __init__(self, in_features: int, out_features: int, kappa: float):
        super().__init__()
        self.kappa = kappa
        self.W = nn.Parameter(torch.empty(out_features, out_features))
        self.Omega = nn.Parameter(torch.empty(out_features, in_features))
        bound = 1.0 / math.sqrt(out_features)
        nn.init.uniform_(self.W, -bound, bound)
        nn.init.uniform_(self.Omega, -bound, bound)

    @torch.no_grad()
    def project_(self, lambda_pf: float) -> None:
        """W <- its projection onto ||W||_inf <= kappa / lambda_pf, in place (as the
        official forward does, so the optimizer's next step starts from the projected W)."""
        self.W.copy_(project_inf_ball(self.W, self.kappa / lambda_pf))

    def problem(self, u: Tensor, adj_t: Tensor):
        """(func, h0): F on the state (1, m, N), and X0 = Omega U A."""
        injection = sparse_right_multiply(self.Omega @ u, adj_t)       # Omega U A, (m, N)

        def func(h: Tensor) -> Tensor:
            return F.relu(sparse_right_multiply(self.W @ h[0], adj_t) + injection)[None]

        return func, injection.detach()[None]

    def forward(self, u: Tensor, adj_t: Tensor, lambda_pf: float, solver: SolverConfig,
                estimator: EstimatorConfig, backward_stats: list | None = None
                ) -> tuple[Tensor, SolverStats]:
        """The layer's equilibrium X* (m, N) and the forward solver's stats; an ``implicit``
        backward appends its SolverStats to ``backward_stats``."""
        self.project_(lambda_pf)
        func, h0 = self.problem(u, adj_t)
        h, stats = implicit_layer(func, h0, solver, estimator, training=self.training,
                                  backward_stats=backward_stats)
        return h[0], stats


class _Group(nn.Module):
    """A view of some parameters of the model, for :meth:`IGNN.parts`."""

    def __init__(self, params):
        super().__init__()
        self.params = nn.ParameterList(params)


class IGNN(nn.Module):
    """Stacked implicit graph layers and a graph or node readout (see the module docstring).

    ``forward(batch, solver, estimator)`` takes a batch dict: ``x`` (N, p) node features,
    ``adj_t`` the sparse A^T of the block-diagonal adjacency, ``lambda_pf`` its Perron-
    Frobenius eigenvalue, and for ``graph`` readouts ``graph`` (N,) node -> graph index and
    ``num_graphs``. Returns (logits (num_graphs or N, num_classes), the stats of the
    last layer's solve); every layer's stats are in the layer record
    (``pipeline.deq.record_layers``).
    """

    def __init__(self, config: IGNNConfig):
        super().__init__()
        self.config = config
        c = config
        widths = [c.hidden] * c.num_layers
        if c.skip:
            widths[-1] = c.num_classes
        ins = [c.in_features] + widths[:-1]
        self.layers = nn.ModuleList(ImplicitGraph(i, o, c.kappa) for i, o in zip(ins, widths))
        self.skips = nn.ModuleList(nn.Linear(i, o) for i, o in zip(ins, widths)) if c.skip \
            else nn.ModuleList()
        if c.readout == "graph":
            self.head = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.ReLU(),
                                      nn.Dropout(c.dropout), nn.Linear(c.hidden, c.num_classes))
        elif c.skip:
            self.head = nn.Identity()
        else:
            self.head = nn.Sequential(nn.Dropout(c.dropout),
                                      nn.Linear(c.hidden, c.num_classes, bias=False))

    def parts(self) -> dict[str, nn.Module]:
        """F (every W), the injection (every Omega and skip) and the head, for the
        per-part gradient diagnostics."""
        injection = [layer.Omega for layer in self.layers] + list(self.skips.parameters())
        return {"F": _Group([layer.W for layer in self.layers]), "injection": _Group(injection),
                "head": self.head}

    def forward(self, batch: dict, solver: SolverConfig, estimator: EstimatorConfig,
                backward_stats: list | None = None) -> tuple[Tensor, SolverStats]:
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            u = batch["x"].t()                                           # (p, N)
            stats = SolverStats()
            for i, layer in enumerate(self.layers):
                x, stats = layer(u, batch["adj_t"], float(batch["lambda_pf"]), solver,
                                 estimator, backward_stats)
                if self.config.skip:
                    x = x + self.skips[i](u.t()).t()
                    if i < len(self.layers) - 1:
                        x = F.elu(x)
                u = x
            nodes = u.t()                                                # (N, m)
            if self.config.readout == "graph":
                pooled = nodes.new_zeros(int(batch["num_graphs"]), nodes.shape[1])
                pooled = pooled.index_add(0, batch["graph"], nodes)      # global_add_pool
                return self.head(pooled), stats
            if self.config.normalize_nodes:
                nodes = F.normalize(nodes, dim=-1)
            return self.head(nodes), stats
