"""The DEQ-Transformer (pipeline/models/deq_transformer.py): the paper-settings parameter
count on the meta device, causality of F, of a fixed-length unroll and of a Broyden solve,
segment memory, the adaptive softmax as a distribution, and PostLN / PreLN."""
from __future__ import annotations

import pytest
import torch

from pipeline.deq import EstimatorConfig, SolverConfig, solve, unroll
from pipeline.models.deq_transformer import (DEQTransformer, DEQTransformerConfig,
                                              position_dropout, rel_shift)

SMALL = dict(n_token=120, d_model=16, n_head=2, d_head=8, d_inner=32, cutoffs=(20, 60),
             div_val=2, mem_len=5, tgt_len=7, dropout=0.0)


def small_model(**overrides) -> DEQTransformer:
    torch.manual_seed(0)
    return DEQTransformer(DEQTransformerConfig(**{**SMALL, **overrides})).double()


# The official model (locuslab/deq DEQ-Sequence v2, commit 1fb7059d6d89bb26d16da80ab9489dcc73fc5472)
# at the paper settings, counted 2026-12-04 as ``sum(p.numel() for p in model.parameters())`` on
# the ``meta`` device, from a scratch folder outside this project (the official code is not on
# PyPI and nothing of it is in the project): ``git archive 1fb7059 DEQ-Sequence lib | tar x``,
# a ``termcolor`` stub (``colored = lambda s, *a, **k: s``), PYTHONPATH=<scratch>:
# <scratch>/DEQ-Sequence:<stubs>, then ``with torch.device("meta"):
# DEQTransformerLM(267735, 2, 24, 10, 700, 70, 48000, 0.05, 0.0, tie_weights=True, d_embed=700,
# div_val=4, tie_projs=[False, True, True, True], pre_lnorm=False, wnorm=True, local_size=0,
# pretrain_steps=32000, tgt_len=150, mem_len=150, cutoffs=[20000, 40000, 200000], load='')``
# (PreLN: the same count, its layer norms have no parameters).
OFFICIAL_COUNT = 97_851_488


def test_paper_settings_count_on_the_meta_device():
    """The official 98M model, built without memory on ``meta``, against the official code's
    own count. Ours counts every tensor once: the weight-norm (g, v) pairs both, the tied word
    weights and tail projections once (they are the input embedding's Parameters), the
    untied first softmax projection (490,000) on its own. The official code makes its tail
    projections separate Parameters that share the embedding's storage
    (``out_projs[i].weight.data = emb_projs[i].weight.data``), so ``parameters()`` counts
    them twice: 159,600 more. That is the whole difference (a listed deviation); the layer
    norms (no parameters) and the injection (no weight norm) are the official ones."""
    for pre_ln in (False, True):
        with torch.device("meta"):
            model = DEQTransformer(DEQTransformerConfig(pre_ln=pre_ln))
        assert all(p.is_meta for p in model.parameters())
        count = sum(p.numel() for p in model.parameters())
        tail_projs = sum(p.numel() for p in list(model.embedding.projs)[1:])
        assert tail_projs == 175 * 700 + 43 * 700 + 10 * 700 == 159_600
        assert count == 97_691_888 == OFFICIAL_COUNT - tail_projs, pre_ln
    assert count - model.softmax.proj0.numel() == 97_201_888  # the first projection tied too
    # the layer F alone, shape by shape (v and g of each weight-normed map, then biases;
    # the layer norms have none)
    d, inner = 700, 48_000
    layer = ((3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * d + d + d)
             + (d * inner + inner + inner) + (inner * d + d + d))
    assert sum(p.numel() for p in model.layer.parameters()) == layer == 69_753_000
    assert sum(p.numel() for p in model.inject.parameters()) == 3 * d * d + 3 * d


def test_tied_weights_are_the_embedding_parameters():
    model = small_model()
    weights, projs = model.softmax._weights()
    assert all(w is layer.weight for w, layer in zip(weights, model.embedding.layers))
    assert projs[0] is model.softmax.proj0 and projs[0] is not model.embedding.projs[0]
    assert all(p is q for p, q in zip(projs[1:], list(model.embedding.projs)[1:]))
    untied = small_model(tie_weights=False, tie_projs=False)
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == sum(w.numel() for w in weights) + sum(p.numel() for p in projs[1:])


@pytest.mark.parametrize("pre_ln", [False, True])
def test_adaptive_softmax_is_a_distribution_over_the_vocabulary(pre_ln):
    model = small_model(pre_ln=pre_ln).eval()
    # one hidden state per row, scored against every word of the vocabulary
    h = torch.randn(3, 1, SMALL["d_model"], dtype=torch.float64).expand(-1, SMALL["n_token"], -1)
    target = torch.arange(SMALL["n_token"]).expand(3, -1)
    nll = model.head(h, target)
    # summed over every word (head words and each cluster's tail words), p = 1
    torch.testing.assert_close(torch.exp(-nll).sum(1), torch.ones(3, dtype=torch.float64))


def _problem(model, tokens, memory):
    func, h0, us, _ = model.problem(tokens, memory)
    return func, h0


@pytest.mark.parametrize("pre_ln", [False, True])
def test_changing_a_future_token_leaves_earlier_outputs_unchanged(pre_ln):
    """Exactly for one F call and for a fixed-length unroll (the pretraining stack); to
    the solver's tolerance for Broyden (PostLN), whose update and residual span the whole
    segment. The init is scaled up (init_std 0.1): at the official 0.01 of the embedding and
    of the injection, a token moves h* by about 1e-4, the size of the solver's error."""
    model = small_model(pre_ln=pre_ln, init_std=0.1).eval()
    L, t = SMALL["tgt_len"], 4
    torch.manual_seed(1)
    memory = (torch.randn(2, 5, 16, dtype=torch.float64),
              torch.randn(2, 5, 48, dtype=torch.float64))
    tokens = torch.randint(0, SMALL["n_token"], (2, L))
    # another word of the same adaptive-input cluster: the cluster's embedding batch keeps
    # its size (a matrix product's rounding can depend on the batch's rows)
    changed = tokens.clone()
    lo = torch.tensor([0, *SMALL["cutoffs"]])[torch.bucketize(changed[:, t], torch.tensor(
        SMALL["cutoffs"]), right=True)]
    size = torch.tensor([*SMALL["cutoffs"], SMALL["n_token"]]).diff(prepend=torch.tensor([0]))[
        torch.bucketize(changed[:, t], torch.tensor(SMALL["cutoffs"]), right=True)]
    changed[:, t] = lo + (changed[:, t] - lo + 1) % size
    f_a, h0 = _problem(model, tokens, memory)
    f_b, _ = _problem(model, changed, memory)
    h = torch.randn_like(h0)
    h_future = h.clone()
    h_future[:, t:] += 1.0                      # the state at and after t, changed too
    with torch.no_grad():
        one_a, one_b = f_a(h), f_b(h_future)
        assert torch.equal(one_a[:, :t], one_b[:, :t])
        assert not torch.allclose(one_a[:, t:], one_b[:, t:])
        un_a, un_b = unroll(f_a, h0, 12), unroll(f_b, h0, 12)
        assert torch.equal(un_a[:, :t], un_b[:, :t])
        # at this random init Broyden needs 100-180 steps to 1e-6 (PostLN and the official
        # PreLN, whose F renormalises its output: LN(a) + FF(LN(a)))
        solver = SolverConfig("broyden", 200, 1e-6)
        (br_a, sa), (br_b, sb) = solve(f_a, h0, solver), solve(f_b, h0, solver)
        assert sa.converged and sb.converged
        # each solution is within about its residual ||F(h) - h|| of h*: the early positions
        # agree to that, not exactly (the change at t moves every Broyden step)
        bound = 10 * (sa.abs_residual + sb.abs_residual)
        early = (br_a[:, :t] - br_b[:, :t]).abs().max().item()
        assert 0 < early <= bound < 1e-3
        assert (br_a[:, t:] - br_b[:, t:]).abs().max() > 10 * early


def test_rel_shift_aligns_scores_by_distance():
    """After the shift, entry (i, j) holds the score of distance (m + i) - j, m = k - q."""
    q, k = 3, 5
    r = torch.arange(k, dtype=torch.float64)       # column r: distance k - 1 - r
    scores = r.expand(1, 1, q, k).clone()
    shifted = rel_shift(scores)
    for i in range(q):
        for j in range(k - q + i + 1):             # the causal, unmasked entries
            assert k - 1 - shifted[0, 0, i, j].item() == (k - q + i) - j


def test_memory_carries_the_last_positions_of_states_and_injections():
    model = small_model()
    tokens = torch.randint(0, SMALL["n_token"], (2, SMALL["tgt_len"]))
    solver, est = SolverConfig("broyden", 30, 1e-8), EstimatorConfig("upg", k=3, lam=0.5)
    out = model(tokens, tokens, model.init_memory(2), solver, est)
    z_mem, u_mem = out.memory
    assert z_mem.shape == (2, 5, 16) and u_mem.shape == (2, 5, 48)
    assert not z_mem.requires_grad and not u_mem.requires_grad
    _, _, us, _ = model.problem(tokens, model.init_memory(2))
    torch.testing.assert_close(u_mem, us[:, -5:].detach())
    out.nll.mean().backward()
    assert model.layer.ff1.parametrizations.weight.original1.grad is not None
    # the next segment attends to the memory: it changes the output
    model.eval()
    with torch.no_grad():
        with_mem = model(tokens, tokens, out.memory, solver, est).nll
        without = model(tokens, tokens, model.init_memory(2), solver, est).nll
    assert (with_mem - without).abs().max() > 1e-9   # small at init: tiny embeddings


def test_pre_ln_and_post_ln_differ_only_in_the_flag():
    """The same parameters; PreLN's FF residual adds the normalised input (the official
    block overwrites its input with its norm), and no norm follows h* (none in the official
    code): F's output is LN(a) + FF(LN(a)) with a = h + Attn(LN([mem; h]))."""
    post, pre = small_model(), small_model(pre_ln=True)
    assert [n for n, _ in post.named_parameters()] == [n for n, _ in pre.named_parameters()]
    pre.eval()
    a = torch.randn(2, SMALL["tgt_len"], SMALL["d_model"], dtype=torch.float64)
    layer = pre.layer
    x = torch.nn.functional.layer_norm(a, (SMALL["d_model"],))
    expected = layer.ff2(torch.relu(layer.ff1(x))) + x
    torch.testing.assert_close(layer.feedforward(a, {}), expected)
    h = torch.randn(2, 3, SMALL["d_model"], dtype=torch.float64)
    target = torch.randint(0, SMALL["n_token"], (2, 3))
    assert torch.equal(pre.head(h, target), pre.softmax(h, target))  # no final norm


def test_dropout_masks_have_the_official_shapes():
    """Relative positions: one mask per channel, shared by every position; output: one mask
    per position, dropping whole token vectors (the official (B, 1, L) mask on its (B, C, L)
    layout)."""
    model = small_model(dropout=0.5).train()
    tokens = torch.randint(0, SMALL["n_token"], (3, SMALL["tgt_len"]))
    torch.manual_seed(3)
    _, _, _, out_mask = model.problem(tokens, model.init_memory(3))
    assert out_mask.shape == (3, SMALL["tgt_len"], 1)
    assert set(out_mask.unique().tolist()) <= {0.0, 2.0}
    pos = torch.randn(9, SMALL["d_model"], dtype=torch.float64)
    dropped = position_dropout(pos, 0.5, training=True)
    kept = (dropped != 0).to(torch.float64)
    assert torch.equal(kept, kept[:1].expand_as(kept))  # one mask row for every position
    assert 0 < kept[0].sum() < SMALL["d_model"]
    assert position_dropout(pos, 0.5, training=False) is pos
