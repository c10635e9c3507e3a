"""The study figure modules on hand-made run dicts: each figure and table names the scale
and the dataset of its runs, and the lm time ratio needs a finished reference."""
import pandas as pd
import pytest

from pipeline import tracking as M
from pipeline.figures import graph, lm, vision
from pipeline.figures.common import plt, scales_datasets


def _texts(fig) -> str:
    texts = [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:
        texts.append(fig._suptitle.get_text())
    plt.close(fig)
    return "\n".join(texts)


def _lm_run(name, status="finished", scale="default", dataset="wikitext_tiny", step_s=2.0):
    curves = pd.DataFrame({"step": [0, 1, 2], M.TRAIN_LOSS: [5.0, 4.0, 3.0],
                           M.TIME_STEP: [step_s] * 3, M.PRETRAINING: [0.0] * 3,
                           M.SOLVER_NSTEPS: [3.0] * 3, M.RHO: [0.5, None, 0.6]})
    return {"metrics": {"name": name, "task": "lm", "scale": scale, "dataset": dataset,
                        "estimator": "implicit" if "implicit" in name else "upg", "k": 5,
                        "lam": 0.5, "model": {"pre_ln": name.startswith("preln")},
                        "status": status, "reason": "diverged" if status == "failed" else "",
                        "mean_step_s": step_s, "test_ppl": 100.0, "val_ppl": 110.0,
                        "steps": 3, "history": [{"step": 2, "val_ppl": 110.0}]},
            "curves": curves}


def test_scales_datasets_are_over_all_runs():
    metrics = [{"scale": "paper", "dataset": "b"}, {"scale": "default", "dataset": "a"},
               {"scale": "paper", "dataset": "a"}]
    assert scales_datasets(metrics) == ("default, paper", "a, b")


def test_lm_time_ratio_needs_a_finished_reference():
    runs = {"postln_implicit_jr": _lm_run("postln_implicit_jr", step_s=3.0),
            "postln_implicit": _lm_run("postln_implicit", step_s=5.0),
            "postln_upg": _lm_run("postln_upg", step_s=2.0)}
    assert lm.time_ratio(runs, "postln_upg") == pytest.approx(1.5)
    assert lm.time_ratio(runs, "postln_upg", lm.DEQ_BASELINE) == pytest.approx(2.5)
    runs["postln_implicit_jr"] = _lm_run("postln_implicit_jr", status="failed", step_s=0.1)
    assert lm.time_ratio(runs, "postln_upg") is None
    table = lm.table(runs).set_index("run")
    assert table.loc["postln_upg", "time ratio vs implicit + JR"] == "reference failed"
    assert table.loc["postln_upg", "time ratio vs implicit 30/35"] == pytest.approx(2.5)
    del runs["postln_implicit_jr"], runs["postln_implicit"]
    assert lm.time_ratio(runs, "postln_upg") is None
    table = lm.table(runs).set_index("run")
    assert table.loc["postln_upg", "time ratio vs implicit + JR"] == "reference missing"
    assert table.loc["postln_upg", "time ratio vs implicit 30/35"] == "reference missing"


def test_lm_table_and_figures_name_scale_and_dataset():
    runs = {"postln_implicit_jr": _lm_run("postln_implicit_jr", scale="paper",
                                          dataset="wikitext103"),
            "postln_upg": _lm_run("postln_upg")}
    table = lm.table(runs).set_index("run")
    assert table.loc["postln_upg", ["scale", "dataset"]].tolist() == ["default", "wikitext_tiny"]
    assert table.loc["postln_implicit_jr", "scale"] == "paper"
    for fig in (lm.plot_ppl_time(runs), lm.plot_rho(runs)):
        assert "scale: default, paper; dataset: wikitext103, wikitext_tiny" in _texts(fig)


def _graph_run(dataset, task, scale):
    units = [{"status": "finished", "official": 0.8, "clean": 0.7, "time_per_epoch_s": 1.0,
              "mean_backward_s": 0.1, "diagnostics": None}]
    stats = {"n": 1, "mean": 0.8, "std": 0.0, "best": 0.8}
    curves = pd.DataFrame({"unit": ["u0", "u0"], "step": [0, 1],
                           M.SOLVER_STOP_RESIDUAL: [1e-3, 1e-4], M.RHO: [0.5, 0.6],
                           M.RHO_LAMBDA: [0.7, 0.8]})
    history = pd.DataFrame({"unit": ["u0", "u0"], "epoch": [0, 1], "f1": [0.5, 0.6]})
    return {"metrics": {"study": task, "name": dataset, "dataset": dataset, "task": task,
                        "scale": scale, "estimator": "upg", "k": 5, "lam": 0.5,
                        "protocol": "official", "units": units, "failed": [], "epochs": 2,
                        "official": stats, "clean": stats, "status": "finished"},
            "curves": curves, "history": history}


def test_graph_table_header_and_figures_name_every_scale():
    runs = {"graph/mutag": _graph_run("mutag", "graph", "default"),
            "graph/proteins": _graph_run("proteins", "graph", "paper"),
            "node/chains": _graph_run("chains", "node", "default")}
    table = graph.table(runs)
    assert set(zip(table.run, table.dataset, table.scale)) == {
        ("graph/mutag", "mutag", "default"), ("graph/proteins", "proteins", "paper"),
        ("node/chains", "chains", "default")}
    assert "scale: default, paper; dataset: chains, mutag, proteins" in graph.header(runs)
    assert "scale: default, paper; dataset: mutag, proteins" in _texts(graph.plot_folds(runs))
    assert "scale: default; dataset: chains" in _texts(graph.plot_f1(runs))
    assert "scale: default, paper; dataset: chains, mutag, proteins" in \
        _texts(graph.plot_dynamics(runs))


def test_vision_figure_names_every_scale():
    curves = pd.DataFrame({"step": [0, 1], M.TRAIN_LOSS: [2.0, 1.5]})
    runs = {"cifar10_large_upg": {"metrics": {"scale": "default", "dataset": "digits",
                                              "spectral": {"rho": 0.9, "rho_lambda": 0.95}},
                                  "curves": curves},
            "imagenet_small_upg": {"metrics": {"scale": "paper", "dataset": "imagenet",
                                               "spectral": None}, "curves": curves}}
    assert "scale: default, paper; dataset: digits, imagenet" in \
        _texts(vision.plot_training(runs))


def test_ablations_table_names_scale_and_dataset():
    from pipeline.figures import ablations
    diagnostics = {"median_grad_s": 0.1, "median_grad_implicit_s": 0.2,
                   "median_grad_speedup_vs_implicit": 2.0, "median_cos_sim_F": 0.9,
                   "median_cos_sim": 0.9, "median_ref_rel_residual": 1e-6,
                   "ref_converged_fraction": 1.0, "count": 2}
    runs = {name: {"metrics": {"name": name, "scale": scale, "dataset": "digits",
                               "estimator": "implicit", "optimizer": "adam", "model": {},
                               "status": "finished", "reason": "", "pretrain_steps": 0,
                               "best": 0.9, "final": 0.8, "epochs_completed": 1, "epochs": 1,
                               "mean_step_s": 1.0, "peak_memory_mb": 10.0,
                               "diagnostics": diagnostics}}
            for name, scale in (("implicit_adam", "default"), ("implicit_big", "paper"))}
    table = ablations.table(runs)
    assert list(table.columns[:3]) == ["ablation", "scale", "dataset"]
    assert list(zip(table.scale, table.dataset)) == [("default", "digits"), ("paper", "digits")]


def test_ablations_table_says_whether_the_speedups_implicit_reference_converged():
    from pipeline.figures import ablations
    base = {"median_grad_s": 0.1, "median_grad_implicit_s": 0.2,
            "median_grad_speedup_vs_implicit": 2.0, "median_cos_sim_F": 0.9,
            "median_cos_sim": 0.9, "median_ref_rel_residual": 1e-6,
            "ref_converged_fraction": 1.0, "count": 4}
    runs = {name: {"metrics": {"name": name, "scale": "default", "dataset": "digits",
                               "estimator": "upg", "k": 5, "lam": 0.5, "optimizer": "sgd",
                               "model": {}, "status": "finished", "reason": "",
                               "pretrain_steps": 0, "best": 0.9, "final": 0.8,
                               "epochs_completed": 1, "epochs": 1, "mean_step_s": 1.0,
                               "peak_memory_mb": 10.0,
                               "diagnostics": {**base, "implicit_converged_fraction": frac}}}
            for name, frac in (("half", 0.5), ("none", 0.0))}
    table = ablations.table(runs).set_index("ablation")
    assert table.loc["half", "implicit_converged"] == "50% of 4"
    assert table.loc["none", "implicit_converged"] == "0% of 4"
