"""Task ``lm`` in the shared loop (pipeline/experiments/lm_tasks.py): segment memory as task
state in the checkpoint (a resumed run equals an uninterrupted one), the Jacobian
regularization term on its seeded steps, the adaptive damping lambda = 1/rho, and the
ordered batches."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import tracking as M
from pipeline.data.wikitext import write_corpus
from pipeline.experiments import train as train_module
from pipeline.experiments.tasks import get_task
from pipeline.experiments.checkpoint import load_checkpoint
from pipeline.experiments.train import train
from pipeline.experiments.train_config import TrainConfig
from pipeline.tracking import NullRun

MODEL = {"preset": "default", "d_model": 16, "n_head": 2, "d_head": 8, "d_inner": 32,
         "cutoffs": [20, 60], "tgt_len": 8, "mem_len": 8, "dropout": 0.1}
TINY = {"task": "lm", "model": MODEL, "data": {"dataset": "tiny", "eval_tokens": 400},
        "epochs": 1, "max_steps": 8, "batch_size": 4, "eval_batch_size": 4, "eval_every": 4,
        "f_max_iter": 6, "b_max_iter": 6, "estimator": "upg", "k": 2, "pretrain_steps": 2,
        "warmup_steps": 2, "grad_clip": 0.25, "diagnostics_every": 0, "memory_every": 0,
        "power_iters": 5, "seed": 3}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus in the wikitext layout: Zipf-like random words, 120 types."""
    root = tmp_path_factory.mktemp("lm")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(120)]
    p = 1.0 / np.arange(1, 121)
    for split, lines in (("train", 400), ("valid", 60), ("test", 60)):
        text = "".join(" ".join(rng.choice(words, size=8, p=p / p.sum())) + "\n"
                       for _ in range(lines))
        if split == "train":
            text += " ".join(words) + "\n"      # every word seen in train
        (root / f"wiki.{split}.tokens").write_text(text)
    write_corpus(root / "tiny", root, name="tiny", source="test", source_sha256="-")
    return root / "tiny"


def run(corpus, checkpoint=None, resume=None, **over):
    cfg = TrainConfig.from_params({**TINY, **over})
    task = get_task("lm")(cfg.model, cfg.data, corpus, "cpu", cfg.batch_size,
                          cfg.eval_batch_size, cfg.seed)
    return train(cfg, task, NullRun(), checkpoint, log=lambda m: None, resume=resume), task


def steady(results) -> pd.DataFrame:
    frame = pd.DataFrame(results["curves"])
    return frame[[c for c in frame.columns if not c.startswith(("time/", "memory/"))]]


def test_ordered_batches_are_contiguous_segments_per_row(corpus):
    task = get_task("lm")(MODEL, {"dataset": "tiny"}, corpus, "cpu", 4, 4, 0)
    stream = task.streams["train"]
    columns = len(stream) // 4
    batches = list(task.batches("train", 0))
    assert len(batches) == task.steps_per_epoch() == (columns - 1) // 8
    for i in (0, 1, len(batches) - 1):
        b = batches[i]
        for row in range(4):
            start = row * columns + i * 8
            assert torch.equal(b["x"][row], stream[start:start + 8])
            assert torch.equal(b["y"][row], stream[start + 1:start + 9])
    # rank 1 of 2 takes the second half of the 8 rows
    rank1 = next(task.batches("train", 0, rank=1, world_size=2))
    assert torch.equal(rank1["x"][0], stream[4 * (len(stream) // 8):][:8])


def test_resume_with_segment_memory_equals_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    straight, _ = run(corpus, checkpoint_every=3)
    ck = tmp_path / "last.pt"
    real_step = train_module.train_step

    def killed_at_5(cfg, task, model, opt, sched, batch, state, diag_cfg, *args, **kwargs):
        if state["step"] == 5:
            raise KeyboardInterrupt("killed")
        return real_step(cfg, task, model, opt, sched, batch, state, diag_cfg, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, checkpoint=ck, checkpoint_every=3)
    monkeypatch.setattr(train_module, "train_step", real_step)
    saved = load_checkpoint(ck)
    assert saved["state"]["step"] == 3
    memory = saved["state"]["task"]["memory"]
    assert saved["state"]["task"]["index"] == 2 and memory[0].shape == (4, 8, 16)
    resumed, _ = run(corpus, resume=saved, checkpoint_every=3)
    pd.testing.assert_frame_equal(steady(resumed), steady(straight))
    untimed = lambda hist: [{k: v for k, v in h.items() if k != "epoch_s"} for h in hist]
    assert untimed(resumed["history"]) == untimed(straight["history"])
    assert resumed["test_ppl"] == straight["test_ppl"]
    # without the memory the resumed step cannot start: it says why
    saved = load_checkpoint(ck)
    del saved["state"]["task"]
    with pytest.raises(RuntimeError, match="no segment memory for segment 3 of epoch 0"):
        run(corpus, resume=saved, checkpoint_every=3)


def test_jacobian_term_on_its_seeded_steps_only(corpus):
    jr = {"weight": 0.5, "freq": 0.5, "incr": 0.1, "incr_every": 3}
    results, _ = run(corpus, jacobian_reg=jr)
    cfg = TrainConfig.from_params({**TINY, "jacobian_reg": jr}).jacobian_reg_config
    for row in results["curves"]:
        step, pretraining = row["step"], row[M.PRETRAINING] == 1.0
        if cfg.applies(step, pretraining):
            assert row[M.JR_WEIGHT] == pytest.approx(0.5 + 0.1 * (step // 3))
            assert row[M.JR_VALUE] > 0
        else:
            assert row[M.JR_WEIGHT] == 0.0 and M.JR_VALUE not in row
    assert any(r[M.JR_WEIGHT] > 0 for r in results["curves"]), "seed 3 draws some JR steps"
    assert results["curves"][-1][M.TOKENS_PER_S] > 0
    off, _ = run(corpus)
    assert all(r[M.JR_WEIGHT] == 0.0 for r in off["curves"])


def test_adaptive_lambda_is_one_over_rho_clipped(corpus):
    results, _ = run(corpus, estimator="npg", adaptive_lam_every=3)
    lams = [r[M.TRAIN_LAM] for r in results["curves"] if r[M.PRETRAINING] == 0.0]
    assert lams[0] == 0.5                          # the configured lam until the first refresh
    assert all(0 < lam <= 1 for lam in lams)
    assert lams[1] != 0.5 and lams[1] == lams[2] == lams[3]   # refreshed every 3 steps
