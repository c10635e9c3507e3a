"""DEQ-Transformer: the official DEQ-Sequence v2 language model (locuslab/deq), for
appendix §4.3 (WikiText-103 with UPG plus Jacobian regularization).

The model::

    u = W_inj x_emb                     input injection (one linear map to q, k, v: 3 d_model),
                                        x_emb the adaptive input embedding of the tokens
    h* = F(h*; u, memory)               the equilibrium, solved by pipeline.deq.implicit_layer
    F(h) = FF(Attn(h))                  one Transformer-XL layer:
      Attn: [z_mem; h] -> q, k, v = W_qkv [z_mem; h] + [u_mem; u]; relative-position scores
            (Transformer-XL's r_w / r_r biases and rel-shift), causal mask over memory + h
      FF:   two linear maps, ReLU between
    logits  adaptive softmax of h*, its weights (and all but the first projection) tied to
            the adaptive input's

Checked against the official ``DEQ-Sequence/models/deq_transformer.py`` and
``lib/optimizations.py`` at locuslab/deq commit 1fb7059 (2026-12-04); the differences that
remain are in ``pipeline/figures/reference.yaml``'s deviations. As the official code:

* Segment memory: the last ``mem_len`` positions of [z_mem; h*] and of [u_mem; u] (the
  fixed points and the injections that made them), detached.
* Weight norm on F's linear maps only (q/k/v, the relative-position map, the attention
  output, both FF maps); the injection is a plain linear map with a bias.
* Layer norm without learnable parameters (``F.layer_norm`` in the official code).
* Dropout is variational, one mask per forward shared by every iteration of F, so F stays
  one fixed map for the solver: the attention output and the FF masks per channel (shared
  by every position); the attention probabilities one mask (B, heads, q, k); the relative
  position embedding one mask per channel, shared by every position and sequence
  (``VariationalHidDropout`` on (1, d_model, klen)); the output one mask per position,
  dropping whole token vectors (the official ``VariationalDropout`` applied to the
  (B, C, L) layout draws (B, 1, L): a layout quirk, reproduced).
* PostLN (the default: layer norm after each residual sum) and PreLN (``pre_ln``: layer
  norm on the attention's input [mem; h], and the FF block's input replaced by its norm,
  so its residual adds the normalised input; no final norm before the softmax).
* Init (``train_transformer.py``'s ``weights_init``, init_std = proj_init_std = 0.01):
  embeddings, projections, the injection's weight, the relative-position biases and the
  softmax's cluster weights N(0, 0.01); the biases of the injection and of F's maps 0; the
  weight-normed weights PyTorch's default with g = ||v||.

Pretraining is the official weight-tied stack: ``EstimatorConfig("unrolled", k=2)`` runs
F twice from h = 0 (``pretrain_layers``).

Porting notes: no ``torch.version.cuda`` at import, no ``cuda.synchronize()`` in hooks, no
pickles (the vocabulary is a text file).

>>> cfg = DEQTransformerConfig.from_params({"preset": "default"}, n_token=8000)
>>> model = DEQTransformer(cfg)
>>> tokens = torch.randint(0, 8000, (2, 8))
>>> out = model(tokens, tokens, model.init_memory(2), SolverConfig("anderson", 6, 1e-3),
...             EstimatorConfig("upg", k=2, lam=0.5))
>>> out.nll.shape, out.memory[0].shape
(torch.Size([2, 8]), torch.Size([2, 8, 64]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pipeline.deq import EstimatorConfig, SolverConfig, SolverStats, implicit_layer
from pipeline.models.presets import from_preset

Tensor = torch.Tensor
Memory = tuple[Tensor, Tensor]  # (z_mem (B, M, d_model), u_mem (B, M, 3 d_model))


@dataclass(frozen=True)
class DEQTransformerConfig:
    """DEQ-Transformer hyperparameters; the defaults are the official 98M WikiText-103 model
    (``../shared/reference/paper-numbers.md``: d_model 700, 10 heads of 70, d_inner 48,000,
    adaptive input and softmax with div_val 4 and cutoffs [20000, 40000, 200000]).

    Args:
        n_token: vocabulary size (from the dataset).
        d_model, n_head, d_head, d_inner: the layer's widths.
        cutoffs: adaptive input / softmax cluster boundaries (ids are by descending count).
        div_val: each tail cluster's embedding is ``div_val`` times narrower.
        dropout: variational dropout on the injection, attention output, FF and output.
        dropatt: dropout on the attention probabilities.
        pre_ln: PreLN instead of PostLN.
        tie_weights: the softmax's cluster weights are the embedding's.
        tie_projs: the softmax's tail projections are the embedding's (the first is not,
            as the official ``tie_projs = [False] + [True] * len(cutoffs)``).
        mem_len: memory positions carried between segments; tgt_len: positions per segment.
        pretrain_layers: F applications of the weight-tied pretraining stack.
        init_std, proj_init_std: the normal init of the embeddings, the injection, the
            relative-position biases and cluster weights (init_std), and the projections
            (proj_init_std): 0.01 each in the official scripts.
    """

    n_token: int = 267_735
    d_model: int = 700
    n_head: int = 10
    d_head: int = 70
    d_inner: int = 48_000
    cutoffs: tuple = (20_000, 40_000, 200_000)
    div_val: int = 4
    dropout: float = 0.06
    dropatt: float = 0.01
    pre_ln: bool = False
    tie_weights: bool = True
    tie_projs: bool = True
    mem_len: int = 300
    tgt_len: int = 150
    pretrain_layers: int = 2
    init_std: float = 0.01
    proj_init_std: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "cutoffs", tuple(int(c) for c in self.cutoffs))
        bounds = (0, *self.cutoffs, self.n_token)
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"cutoffs {list(self.cutoffs)} must increase strictly inside "
                             f"(0, n_token={self.n_token})")
        if self.div_val < 1 or self.d_model // self.div_val ** len(self.cutoffs) < 1:
            raise ValueError(f"div_val={self.div_val} leaves an empty embedding for the last "
                             f"cluster at d_model={self.d_model}")
        for name in ("dropout", "dropatt"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if min(self.d_model, self.n_head, self.d_head, self.d_inner, self.tgt_len) < 1 \
                or self.mem_len < 0 or self.pretrain_layers < 1:
            raise ValueError("widths, tgt_len and pretrain_layers must be >= 1, mem_len >= 0")

    @classmethod
    def from_params(cls, params: dict, **data_fields) -> "DEQTransformerConfig":
        """A run's ``model:`` block: ``preset`` plus overrides; ``n_token`` from the data."""
        return from_preset(cls, params, PRESETS, "default", data_fields, DATA_FIELDS,
                           "DEQ-Transformer", "the corpus's vocabulary")

    @property
    def cluster_dims(self) -> list[int]:
        """Embedding width of each cluster: d_model / div_val^i (Transformer-XL)."""
        return [self.d_model // self.div_val ** i for i in range(len(self.cutoffs) + 1)]


DATA_FIELDS = ("n_token",)

# Named presets: the dataclass defaults plus these changes.
PRESETS: dict[str, dict] = {
    # the official 98M model: the dataclass defaults, with the JR scripts' dropout 0.06,
    # dropatt 0.01, mem_len 300 as params.yaml's paper scale (no-JR script: 0.05, 0.0, 150)
    "paper": {},
    # the 2-core CPU scale of the lm study (issue 11): d_model 64, 2 heads, d_inner 256
    "default": {"d_model": 64, "n_head": 2, "d_head": 32, "d_inner": 256,
                "cutoffs": (2000, 6000), "mem_len": 32, "tgt_len": 32},
}


def variational_mask(like: Tensor, width: int, p: float, training: bool) -> Optional[Tensor]:
    """A dropout mask (B, 1, width), shared by every position (``VariationalHidDropout``);
    None when not training or p = 0."""
    if not training or p == 0.0:
        return None
    return like.new_empty(like.shape[0], 1, width).bernoulli_(1.0 - p) / (1.0 - p)


def position_dropout(pos: Tensor, p: float, training: bool) -> Tensor:
    """Dropout of the relative-position embedding (klen, d_model): one mask per channel,
    shared by every position and sequence (the official ``VariationalHidDropout`` on
    (1, d_model, klen)); ``pos`` itself when not training or p = 0."""
    if not training or p == 0.0:
        return pos
    return pos * (pos.new_empty(1, pos.shape[-1]).bernoulli_(1.0 - p) / (1.0 - p))


def _drop(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    return x if mask is None else x * mask


def sinusoid_positions(distances: Tensor, d_model: int) -> Tensor:
    """Transformer-XL's sinusoid embedding of relative distances: (len, d_model)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=distances.device,
                                             dtype=distances.dtype)
                                / d_model))
    angles = distances[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x: Tensor) -> Tensor:
    """Transformer-XL's shift of relative scores (B, H, q, k): column j of row i then holds
    the score of distance (k - q + i) - j. Entries above the causal diagonal are garbage,
    and are masked."""
    b, h, q, k = x.shape
    padded = torch.cat([x.new_zeros(b, h, q, 1), x], dim=3).view(b, h, k + 1, q)
    return padded[:, :, 1:].reshape(b, h, q, k)


class Layer(nn.Module):
    """F: one weight-normed Transformer-XL layer (relative attention with memory, then FF)."""

    def __init__(self, cfg: DEQTransformerConfig):
        super().__init__()
        self.cfg = cfg
        d, nh, dh = cfg.d_model, cfg.n_head, cfg.d_head
        self.qkv = weight_norm(nn.Linear(d, 3 * nh * dh, bias=False))
        self.r_net = weight_norm(nn.Linear(d, nh * dh, bias=False))
        self.r_w_bias = nn.Parameter(torch.empty(nh, dh).normal_(0.0, cfg.init_std))
        self.r_r_bias = nn.Parameter(torch.empty(nh, dh).normal_(0.0, cfg.init_std))
        self.o_net = weight_norm(nn.Linear(nh * dh, d))
        self.ln_attn = nn.LayerNorm(d, elementwise_affine=False)
        self.ff1 = weight_norm(nn.Linear(d, cfg.d_inner))
        self.ff2 = weight_norm(nn.Linear(cfg.d_inner, d))
        self.ln_ff = nn.LayerNorm(d, elementwise_affine=False)
        for linear in (self.o_net, self.ff1, self.ff2):  # the official init zeroes them
            nn.init.zeros_(linear.bias)
        self.scale = 1.0 / math.sqrt(dh)

    def attention(self, h: Tensor, z_mem: Tensor, us: Tensor, pos: Tensor,
                  masks: dict) -> Tensor:
        cfg = self.cfg
        b, q, _ = h.shape
        nh, dh = cfg.n_head, cfg.d_head
        m = z_mem.shape[1]
        k = m + q
        cat = torch.cat([z_mem, h], dim=1)
        if cfg.pre_ln:
            cat = self.ln_attn(cat)
        heads = self.qkv(cat) + us                    # the input injection (official v2)
        wq, wk, wv = heads.chunk(3, dim=-1)
        wq = wq[:, -q:].reshape(b, q, nh, dh)
        wk, wv = wk.reshape(b, k, nh, dh), wv.reshape(b, k, nh, dh)
        rk = self.r_net(pos).reshape(k, nh, dh)
        ac = torch.einsum("bind,bjnd->bnij", wq + self.r_w_bias, wk)
        bd = rel_shift(torch.einsum("bind,jnd->bnij", wq + self.r_r_bias, rk))
        scores = (ac + bd) * self.scale
        future = torch.ones(q, k, dtype=torch.bool, device=h.device).triu(1 + m)
        probs = _drop(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1),
                      masks.get("attn_probs"))
        out = _drop(self.o_net(torch.einsum("bnij,bjnd->bind", probs, wv).reshape(b, q, nh * dh)),
                    masks.get("attn"))
        return out + h if cfg.pre_ln else self.ln_attn(out + h)

    def feedforward(self, h: Tensor, masks: dict) -> Tensor:
        # PreLN: the official block overwrites its input with its norm, so the residual
        # adds the normalised input
        x = self.ln_ff(h) if self.cfg.pre_ln else h
        inner = _drop(torch.relu(self.ff1(x)), masks.get("ff1"))
        out = _drop(self.ff2(inner), masks.get("ff2")) + x
        return out if self.cfg.pre_ln else self.ln_ff(out)

    def forward(self, h: Tensor, z_mem: Tensor, us: Tensor, pos: Tensor, masks: dict) -> Tensor:
        return self.feedforward(self.attention(h, z_mem, us, pos, masks), masks)


class AdaptiveInput(nn.Module):
    """Adaptive input embedding (Baevski & Auli; Transformer-XL's ``AdaptiveEmbedding``):
    cluster i embeds its ids in d_model / div_val^i dims, projected to d_model, times
    sqrt(d_model)."""

    def __init__(self, cfg: DEQTransformerConfig):
        super().__init__()
        self.bounds = (0, *cfg.cutoffs, cfg.n_token)
        dims = cfg.cluster_dims
        self.layers = nn.ModuleList(nn.Embedding(hi - lo, dim) for lo, hi, dim in
                                    zip(self.bounds, self.bounds[1:], dims))
        self.projs = nn.ParameterList(nn.Parameter(torch.empty(cfg.d_model, dim)) for dim in dims)
        self.scale = math.sqrt(cfg.d_model)
        self.d_model = cfg.d_model

    def forward(self, tokens: Tensor) -> Tensor:
        flat = tokens.reshape(-1)
        out = self.projs[0].new_zeros(flat.shape[0], self.d_model)
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_copy(0, idx, Fn.linear(self.layers[i](flat[idx] - lo),
                                                      self.projs[i]))
        return (out * self.scale).view(*tokens.shape, self.d_model)


class AdaptiveSoftmax(nn.Module):
    """Projected adaptive log-softmax (Transformer-XL's ``ProjectedAdaptiveLogSoftmax``):
    the head scores the first cluster's words and one logit per tail cluster; a word of
    tail cluster i costs head[cluster i] + its log-probability inside the cluster. The
    word weights are the input embedding's, the tail projections too (``tie_projs``)."""

    def __init__(self, cfg: DEQTransformerConfig, embedding: AdaptiveInput):
        super().__init__()
        self.bounds = embedding.bounds
        n_clusters = len(cfg.cutoffs)
        self.cluster_weight = nn.Parameter(torch.empty(n_clusters, cfg.cluster_dims[0])
                                           .normal_(0.0, cfg.init_std))
        self.cluster_bias = nn.Parameter(torch.zeros(n_clusters))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(hi - lo))
                                       for lo, hi in zip(self.bounds, self.bounds[1:]))
        dims = cfg.cluster_dims
        if not cfg.tie_weights:
            self.own_weights = nn.ParameterList(nn.Parameter(torch.empty(hi - lo, dim)) for
                                                lo, hi, dim in zip(self.bounds, self.bounds[1:],
                                                                   dims))
        self.proj0 = nn.Parameter(torch.empty(cfg.d_model, dims[0]))      # never tied
        if not cfg.tie_projs:
            self.own_projs = nn.ParameterList(nn.Parameter(torch.empty(cfg.d_model, d))
                                              for d in dims[1:])
        self._embedding = [embedding]  # not a submodule: its parameters belong to the input
        self.tied = (cfg.tie_weights, cfg.tie_projs)

    def _weights(self) -> tuple[list[Tensor], list[Tensor]]:
        # the tied tensors are read from the input embedding on each call (they are its
        # Parameters, counted once by model.parameters())
        emb = self._embedding[0]
        weights = ([layer.weight for layer in emb.layers] if self.tied[0]
                   else list(self.own_weights))
        projs = [self.proj0] + (list(emb.projs)[1:] if self.tied[1] else list(self.own_projs))
        return weights, projs

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood of ``target`` (shape of hidden without its last dim)."""
        shape = target.shape
        hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        weights, projs = self._weights()
        head_hidden = hidden @ projs[0]
        head_logits = torch.cat([head_hidden @ weights[0].t() + self.biases[0],
                                 head_hidden @ self.cluster_weight.t() + self.cluster_bias],
                                dim=1)
        head_logprob = torch.log_softmax(head_logits, dim=1)
        nll = hidden.new_zeros(target.shape[0])
        head_size = self.bounds[1]
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            if not idx.numel():
                continue
            if i == 0:
                logprob = head_logprob[idx].gather(1, target[idx, None]).squeeze(1)
            else:
                tail = torch.log_softmax((hidden[idx] @ projs[i]) @ weights[i].t()
                                         + self.biases[i], dim=1)
                logprob = (head_logprob[idx, head_size + i - 1]
                           + tail.gather(1, (target[idx] - lo)[:, None]).squeeze(1))
            nll = nll.index_copy(0, idx, -logprob)
        return nll.view(shape)


class LMOutput(NamedTuple):
    nll: Tensor                # (B, L) per-token negative log-likelihood
    memory: Memory             # the next segment's memory (detached)
    stats: SolverStats         # the forward solve's


class DEQTransformer(nn.Module):
    """The DEQ-Transformer language model (see the module docstring)."""

    def __init__(self, config: DEQTransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = AdaptiveInput(config)
        self.inject = nn.Linear(config.d_model, 3 * config.n_head * config.d_head)
        self.layer = Layer(config)
        self.softmax = AdaptiveSoftmax(config, self.embedding)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init (module docstring): embeddings and the injection N(0, init_std)
        with a zero bias, projections N(0, proj_init_std); the weight-normed linear maps
        keep PyTorch's default init with g = ||v||."""
        cfg = self.config
        nn.init.normal_(self.inject.weight, 0.0, cfg.init_std)
        nn.init.zeros_(self.inject.bias)
        for layer in self.embedding.layers:
            nn.init.normal_(layer.weight, 0.0, cfg.init_std)
        for p in [*self.embedding.projs, self.softmax.proj0,
                  *getattr(self.softmax, "own_projs", [])]:
            nn.init.normal_(p, 0.0, cfg.proj_init_std)
        for p in getattr(self.softmax, "own_weights", []):
            nn.init.normal_(p, 0.0, cfg.init_std)

    def parts(self) -> dict[str, nn.Module]:
        """F (the implicit layer), the injection (embedding and its map), the head."""
        return {"F": self.layer, "injection": nn.ModuleList([self.embedding, self.inject]),
                "head": self.softmax}

    def init_memory(self, batch_size: int, device=None) -> Memory:
        """An empty memory (no positions) for a new stream."""
        p = self.inject.weight
        d, width = self.config.d_model, 3 * self.config.n_head * self.config.d_head
        return (p.new_zeros(batch_size, 0, d, device=device),
                p.new_zeros(batch_size, 0, width, device=device))

    def problem(self, tokens: Tensor, memory: Memory
                ) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor, Tensor]:
        """(func, h0, us, out_mask): F on h (B, L, d_model) for this segment, with this
        forward's dropout masks, its start (zeros, as the official code), the injections
        [u_mem; u] and the output dropout mask (None in eval)."""
        cfg = self.config
        z_mem, u_mem = memory
        emb = self.embedding(tokens)
        emb = _drop(emb, variational_mask(emb, cfg.d_model, cfg.dropout, self.training))
        us = torch.cat([u_mem, self.inject(emb)], dim=1)
        k = us.shape[1]
        distances = torch.arange(k - 1, -1, -1.0, device=tokens.device, dtype=us.dtype)
        pos = sinusoid_positions(distances, cfg.d_model)
        masks = {name: variational_mask(emb, width, cfg.dropout, self.training)
                 for name, width in (("attn", cfg.d_model), ("ff1", cfg.d_inner),
                                     ("ff2", cfg.d_model))}
        if self.training and cfg.dropatt:  # one attention-dropout mask per forward, too
            b, q = tokens.shape
            masks["attn_probs"] = (torch.rand(b, cfg.n_head, q, k, device=tokens.device)
                                   >= cfg.dropatt).to(emb.dtype) / (1.0 - cfg.dropatt)
        pos = position_dropout(pos, cfg.dropout, self.training)
        # the output mask drops whole positions (B, L, 1), as the official VariationalDropout
        # on its (B, C, L) layout does
        out_mask = (emb.new_empty(*tokens.shape, 1).bernoulli_(1.0 - cfg.dropout)
                    / (1.0 - cfg.dropout)) if self.training and cfg.dropout else None
        layer = self.layer

        def func(h: Tensor) -> Tensor:
            return layer(h, z_mem, us, pos, masks)

        return func, torch.zeros_like(emb), us, out_mask

    def head(self, h: Tensor, target: Tensor, out_mask: Optional[Tensor] = None) -> Tensor:
        """Per-token NLL of ``target`` from the hidden states ``h``."""
        return self.softmax(_drop(h, out_mask), target)

    def next_memory(self, memory: Memory, h: Tensor, us: Tensor) -> Memory:
        """The last ``mem_len`` positions of [z_mem; h*] and [u_mem; u], detached."""
        m = self.config.mem_len
        z = torch.cat([memory[0], h], dim=1).detach()
        u = us.detach()
        return (z[:, max(0, z.shape[1] - m):], u[:, max(0, u.shape[1] - m):]) if m else \
            (z[:, :0], u[:, :0])

    def forward(self, tokens: Tensor, target: Tensor, memory: Memory, solver: SolverConfig,
                estimator: EstimatorConfig) -> LMOutput:
        """Per-token NLL of ``target`` given ``tokens`` (both (B, L)) and ``memory``.

        Training mode runs ``implicit_layer`` with ``estimator``; eval mode runs without
        autograd (the no-grad solve)."""
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            func, h0, us, out_mask = self.problem(tokens, memory)
            h, stats = implicit_layer(func, h0, solver, estimator, training=self.training)
            nll = self.head(h, target, out_mask)
            return LMOutput(nll, self.next_memory(memory, h, us), stats)
