"""Task ``lm``: word-level language modelling with the DEQ-Transformer (appendix §4.3).

Data: a corpus in the layout of :mod:`pipeline.data.wikitext` (``wiki_excerpt``, the
offline default, or ``wikitext103``). Batches are Transformer-XL's ordered ones
(``LMOrderedIterator``, as torchdeq's): the training stream is cut into
``batch_size x world_size`` contiguous rows, rank r takes rows ``r*B .. (r+1)*B - 1``,
and step i reads the segment of ``tgt_len`` tokens at column ``i * tgt_len`` (targets one
token on). Every epoch starts a new pass with empty memory.

Segment memory is the task's state across steps: the memory a step starts from is the
one the previous step's forward left (``DEQTransformer.next_memory``). The step's batch
carries it once resolved, so the loop's diagnostics replays (and their float64 copy) use
the same memory and leave the committed one alone; ``state_dict`` / ``load_state_dict``
put it in the loop's checkpoint, so a resumed run continues with the memory it had.

Loss: the mean per-token negative log-likelihood; training metric ``ppl`` = exp(loss).
Evaluation (eval mode, no dropout, the forward solver only): perplexity over the whole
validation split (``val_ppl``, the primary metric: lower is better) and the test split
(``ppl``), each read in order with ``eval_batch_size`` rows, segments of ``tgt_len`` and the
memory carried from segment to segment. ``summary`` adds ``test_ppl``: the test perplexity
at the evaluation with the best validation perplexity.

``data:`` keys: ``dataset``; ``eval_tokens``: read only the first N tokens of each
evaluation split (null: all of it; the default scale's choice, to fit its CPU budget).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.deq import EstimatorConfig, SolverConfig

Tensor = torch.Tensor


def ordered_rows(stream: Tensor, rows: int) -> Tensor:
    """The stream as ``rows`` contiguous rows (Transformer-XL's ``data.view(bsz, -1)``);
    the tail that does not fill a column is dropped."""
    n = len(stream) // rows
    if n < 2:
        raise ValueError(f"{len(stream)} tokens cannot fill {rows} rows of 2 or more")
    return stream[:n * rows].view(rows, n)


class LMTask:
    """Language modelling with the DEQ-Transformer (see the module docstring)."""

    name = "lm"
    primary_metric = "val_ppl"
    higher_is_better = False
    eval_split = "valid"
    DATA_KEYS = {"dataset", "eval_tokens"}

    def __init__(self, model: dict, data: dict, data_dir: str | Path, device: str,
                 batch_size: int, eval_batch_size: int, seed: int):
        from pipeline.data.wikitext import load_corpus
        from pipeline.models.deq_transformer import DEQTransformerConfig
        unknown = sorted(set(data) - self.DATA_KEYS)
        if unknown:
            raise ValueError(f"unknown lm data keys {unknown}; valid keys: {sorted(self.DATA_KEYS)}")
        meta, vocab, streams = load_corpus(data_dir)
        if data.get("dataset") and meta["name"] != data["dataset"]:
            raise ValueError(f"--data {data_dir} holds {meta['name']!r}, but the run's dataset "
                             f"is {data['dataset']!r}")
        self.dataset = meta["name"]
        self.device, self.batch_size, self.eval_batch_size = device, batch_size, eval_batch_size
        self.seed = seed
        self.model_config = DEQTransformerConfig.from_params(model, n_token=len(vocab))
        self.tgt_len = self.model_config.tgt_len
        self.streams = {s: torch.from_numpy(a.astype(np.int64)).to(device)
                        for s, a in streams.items()}
        self.eval_tokens = data.get("eval_tokens")
        if self.eval_tokens is not None:
            self.eval_tokens = int(self.eval_tokens)
            if self.eval_tokens < 2 * eval_batch_size:
                raise ValueError(f"eval_tokens={self.eval_tokens} cannot fill "
                                 f"eval_batch_size={eval_batch_size} rows of 2 tokens")
        self._committed: dict | None = None   # {"epoch", "index", "memory"} of the last step

    def build_model(self) -> nn.Module:
        from pipeline.models.deq_transformer import DEQTransformer
        return DEQTransformer(self.model_config).to(self.device)

    def pretrain_estimator(self, model) -> EstimatorConfig:
        """The official weight-tied pretraining stack: F applied ``pretrain_layers`` times."""
        return EstimatorConfig("unrolled", k=model.config.pretrain_layers)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        columns = len(self.streams["train"]) // (self.batch_size * world_size)
        return (columns - 1) // self.tgt_len

    def batches(self, split: str, epoch: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[dict]:
        """Training segments of rank ``rank`` (see the module docstring); the memory is
        resolved when the loss first sees the batch."""
        if split != "train":
            raise ValueError("lm evaluates whole splits in evaluate(); batches() is for train")
        B = self.batch_size
        data = ordered_rows(self.streams["train"], B * world_size)[rank * B:(rank + 1) * B]
        for i in range(self.steps_per_epoch(world_size)):
            lo = i * self.tgt_len
            yield {"x": data[:, lo:lo + self.tgt_len], "y": data[:, lo + 1:lo + 1 + self.tgt_len],
                   "epoch": epoch, "index": i}

    def batch_tokens(self, batch: dict) -> int:
        return batch["y"].numel()

    def _memory_for(self, model, batch: dict):
        if batch["index"] == 0:
            return model.init_memory(batch["x"].shape[0])
        c = self._committed
        if c is None or (c["epoch"], c["index"]) != (batch["epoch"], batch["index"] - 1):
            raise RuntimeError(f"no segment memory for segment {batch['index']} of epoch "
                               f"{batch['epoch']}: the previous segment's step did not run here")
        return c["memory"]

    def loss(self, model, batch: dict, solver: SolverConfig, estimator: EstimatorConfig
             ) -> tuple[Tensor, dict[str, float]]:
        if "memory" not in batch:   # the step's own forward: resolve, then commit
            batch["memory"] = self._memory_for(model, batch)
        out = model(batch["x"], batch["y"], batch["memory"], solver, estimator)
        if "next_memory" not in batch:
            batch["next_memory"] = out.memory
            self._committed = {"epoch": batch["epoch"], "index": batch["index"],
                               "memory": out.memory}
        loss = out.nll.mean()
        return loss, {"ppl": math.exp(min(loss.item(), 700.0))}

    def state_dict(self) -> dict:
        """The committed segment memory (tensors and ints: a weights_only checkpoint)."""
        return dict(self._committed) if self._committed is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._committed = dict(state) if state else None
        if self._committed is not None:
            self._committed["memory"] = tuple(m.to(self.device) for m in state["memory"])

    @torch.no_grad()
    def perplexity(self, model, split: str, solver: SolverConfig,
                   estimator: EstimatorConfig) -> float:
        """exp(mean NLL) over every target token of ``split`` (its first ``eval_tokens``),
        read in order."""
        data = ordered_rows(self.streams[split][:self.eval_tokens], self.eval_batch_size)
        memory = model.init_memory(data.shape[0])
        total, count = 0.0, 0
        for lo in range(0, data.shape[1] - 1, self.tgt_len):
            hi = min(lo + self.tgt_len, data.shape[1] - 1)
            out = model(data[:, lo:hi], data[:, lo + 1:hi + 1], memory, solver, estimator)
            total += out.nll.double().sum().item()
            count += out.nll.numel()
            memory = out.memory
        return math.exp(min(total / count, 700.0))

    def evaluate(self, model, solver: SolverConfig, estimator: EstimatorConfig,
                 split: str | None = None) -> dict[str, float]:
        """Validation (``val_ppl``) and test (``ppl``) perplexity, in eval mode."""
        was_training = model.training
        model.eval()
        out = {"val_ppl": self.perplexity(model, "valid", solver, estimator),
               "ppl": self.perplexity(model, "test", solver, estimator)}
        model.train(was_training)
        return out

    @staticmethod
    def summary(history: list[dict]) -> dict:
        """``test_ppl`` / ``val_ppl`` at the best validation evaluation, and the last test."""
        if not history:
            return {"test_ppl": None, "val_ppl": None, "final_test_ppl": None}
        best = min(history, key=lambda h: h["val_ppl"])
        return {"test_ppl": best["ppl"], "val_ppl": best["val_ppl"],
                "final_test_ppl": history[-1]["ppl"]}
