"""The IGNN studies through the one loop: folds and seeds in one job (train-repeats), MLflow
parent and child runs, FAILED units with their reasons, the collapse rule, the protocols,
and params.yaml's graph/node blocks refusing bad values before any job."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from pipeline import tracking as M
from pipeline.config import ParamsError, resolve, study_run
from pipeline.data.graphs import export_chains, export_mutag
from pipeline.experiments import repeats
from pipeline.experiments.tasks import get_task
from pipeline.experiments.step import Divergence, check_capped
from pipeline.experiments.train_config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    export_mutag(root / "mutag")
    export_chains(root / "chains")
    return root


@pytest.fixture(scope="module")
def raw(repo_root) -> dict:
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def _tiny(raw: dict, study: str, name: str, **changes) -> tuple[TrainConfig, dict]:
    params = study_run(resolve(raw), study, name)
    params.update({"epochs": 2, "diagnostics_every": 2, "memory_every": 2,
                   "timing_repeats": 3, "power_iters": 3, **changes})
    if study == "graph":
        params["data"] = {**params["data"], "folds": 3}
    else:
        params["data"] = {**params["data"], "seeds": 2}
    return TrainConfig.from_params(params), params


def _run(cfg, params, data, tmp_path, name, uri="none"):
    return repeats.run_units(cfg, params, study=cfg.task if cfg.task == "node" else "graph",
                             name=name, data_dir=str(data / cfg.data["dataset"]),
                             tracking_uri=uri, artifacts=str(tmp_path / "artifacts"),
                             scale="default", tags={}, checkpoints=tmp_path / "ck",
                             batch_size=1000, log=lambda msg: None)


def test_every_fold_trains_through_the_loop_with_both_protocol_scores(raw, data, tmp_path):
    cfg, params = _tiny(raw, "graph", "mutag_upg_clean")
    summary, results, folder = _run(cfg, params, data, tmp_path, "mutag_upg_clean")
    assert [r["unit"] for r in results] == ["fold0", "fold1", "fold2"]
    assert summary["status"] == "finished" and summary["clean"]["n"] == 3
    for r in results:
        history = r["history"]
        assert [h["epoch"] for h in history] == [1, 2]
        best_val = max(history, key=lambda h: h["val_acc"])
        assert r["clean"] == best_val["acc"] and r["official"] == max(h["acc"] for h in history)
        assert r["diagnostics"]["count"] >= 1 and r["diagnostics"]["ref_converged_fraction"] == 1
        row = r["curves"][-1]
        for key in (M.SOLVER_STOP_RESIDUAL, M.SOLVER_NSTEPS_LAYER.format(layer=3),
                    M.SOLVER_STOP_RESIDUAL_LAYER.format(layer=1), M.TIME_BACKWARD):
            assert key in row or key in r["curves"][-2], key
        assert any(M.RHO in c and M.RHO_LAMBDA in c for c in r["curves"])
    mean = sum(r["clean"] for r in results) / 3
    assert summary["clean"]["mean"] == pytest.approx(mean)
    assert (folder / "fold0.json").is_file()                     # a killed job resumes here
    import torch
    state = torch.load(folder / "fold0.pt", weights_only=True)  # the unit's final weights
    task = get_task("graph")(cfg.model, cfg.data, str(data / "mutag"), "cpu", cfg.batch_size,
                             cfg.eval_batch_size, cfg.seed)
    assert state.keys() == task.build_model().state_dict().keys()


def test_folds_differ_and_a_unit_is_not_rerun_after_a_restart(raw, data, tmp_path):
    cfg, params = _tiny(raw, "graph", "mutag_implicit_official", epochs=1, diagnostics_every=0)
    _, first, folder = _run(cfg, params, data, tmp_path, "r")
    assert len({r["curves"][0][M.TRAIN_LOSS] for r in first}) == 3   # three different folds
    marker = json.loads((folder / "fold1.json").read_text())
    marker["best"] = -1.0                                         # proves fold1 is read back
    (folder / "fold1.json").write_text(json.dumps(marker))
    _, again, _ = _run(cfg, params, data, tmp_path, "r")
    assert again[1]["best"] == -1.0 and again[0]["best"] == first[0]["best"]


def test_mlflow_parent_with_one_child_per_unit_found_again_on_a_rerun(raw, data, tmp_path,
                                                                      store_uri):
    from mlflow.tracking import MlflowClient
    uri = store_uri
    M.init_store(uri, str(tmp_path / "artifacts"), ["node"])
    cfg, params = _tiny(raw, "node", "chains_upg", epochs=2, diagnostics_every=0)
    summary, results, folder = _run(cfg, params, data, tmp_path, "chains_upg", uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("node")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {parent.data.tags[k] for k in ("study", "dataset", "estimator")} == \
        {"node", "chains", "upg"}
    assert "official/best" in parent.data.metrics
    children = M.child_runs(uri, M.Run(client, parent.info.run_id))
    assert sorted(children) == ["chains_upg/seed0", "chains_upg/seed1"]
    # a rerun of the job (its resume folder gone: a new job) finds the same parent and
    # replaces the children, one per unit
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    summary2, _, _ = _run(cfg, params, data, tmp_path, "chains_upg", uri)
    assert summary2["mlflow_parent_run_id"] == parent.info.run_id
    again = M.child_runs(uri, M.Run(client, parent.info.run_id))
    assert sorted(again) == sorted(children) and set(again.values()).isdisjoint(children.values())


def test_a_collapsed_unit_is_failed_with_its_reason_and_kept(raw, data, tmp_path, store_uri):
    """Adam at lr 1000 on chains: the loss explodes past 20x its early value in one seed or
    both; a FAILED unit keeps its reason, in MLflow too, and stays in the summary."""
    from mlflow.tracking import MlflowClient
    uri = store_uri
    cfg, params = _tiny(raw, "node", "chains_implicit", epochs=8, lr=1000.0, grad_clip=None,
                        diagnostics_every=0)
    summary, results, _ = _run(cfg, params, data, tmp_path, "exploding", uri)
    failed = [r for r in results if r["status"] == "failed"]
    assert failed, [r["reason"] for r in results]
    assert summary["failed"] == [{"unit": r["unit"], "reason": r["reason"]} for r in failed]
    run = MlflowClient(uri).get_run(failed[0]["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == failed[0]["reason"]
    assert summary["official"]["n"] == len(results) - len(failed)


def test_capped_forward_with_a_growing_residual_for_E_epochs_is_a_divergence():
    cfg = TrainConfig(diverge_capped_epochs=2, f_max_iter=300, f_stop_mode="inf")

    def epoch(state, e, residual, converged=0.0):
        state["curves"] += [{"step": 2 * e + i, M.PRETRAINING: 0.0, M.FORWARD_CONVERGED: converged,
                             M.SOLVER_STOP_RESIDUAL: residual} for i in range(2)]
        state["epoch"] = e + 1
        check_capped(cfg, state, steps_per_epoch=2)

    state = {"curves": []}
    for e, residual in enumerate([1e-5, 2e-5, 0.9e-5, 1.1e-5, 1e-5, 1.2e-5]):
        epoch(state, e, residual)     # capped, hovering: never a collapse
    epoch(state, 6, 1e-3, 1.0)        # converged: the streak restarts
    epoch(state, 7, 1e-4)
    epoch(state, 8, 5e-4)
    with pytest.raises(Divergence, match="at its cap of 300 steps for 3 epochs with its inf "
                                         "residual grown 20x .* at epoch 10"):
        epoch(state, 9, 2e-3)         # 3 capped epochs, 1e-4 -> 2e-3


@pytest.mark.parametrize("where, value, fragment", [
    ("graph.runs.mutag_upg_clean.data.dataset", "chains", "graph.runs.mutag_upg_clean.data.dataset"),
    ("graph.runs.mutag_upg_clean.data.protocol", "cleaner", "'cleaner' is not one of"),
    ("node.runs.chains_upg.data.folds", 3, "Additional properties are not allowed ('folds'"),
    ("graph.defaults.f_stop_mode", "max", "graph.defaults.f_stop_mode"),
    ("graph.defaults.model.kappa", 1.0, "graph.defaults.model.kappa"),
    ("data.tu.sha256.COX2", "abc", "data.tu.sha256.COX2"),
    ("node.runs.chains_upg.pretrain_steps", 5, "node.runs.chains_upg.pretrain_steps: 0 was expected"),
])
def test_bad_graph_params_are_named_before_any_job(raw, where, value, fragment):
    params = copy.deepcopy(raw)
    node = params
    *parents, leaf = where.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ParamsError) as info:
        resolve(params)
    assert fragment in str(info.value), str(info.value)


def test_graph_and_node_defaults_build_train_configs_at_every_scale(raw):
    for scale in ("default", "paper"):
        params = resolve(raw, scale)
        for study in ("graph", "node"):
            for name in params[study]["runs"]:
                cfg = TrainConfig.from_params(study_run(params, study, name))
                assert cfg.forward_solver.stop_mode == "inf"
                assert cfg.estimator_config.backward_solver.max_iter == 300
    paper = resolve(raw, "paper")
    assert sorted({r["data"]["dataset"] for r in paper["graph"]["runs"].values()}) == \
        ["cox2", "proteins"]
    assert paper["node"]["defaults"]["model"]["preset"] == "ppi"


def test_a_job_whose_every_unit_failed_is_a_failed_parent_with_the_reasons(raw, data, tmp_path,
                                                                           store_uri):
    """Every seed stopped by the loss rule (factor 1e-6: any loss is 'past' it): the job's
    summary and its MLflow parent run are FAILED, with each unit's reason."""
    from mlflow.tracking import MlflowClient
    uri = store_uri
    M.init_store(uri, str(tmp_path / "artifacts"), ["node"])
    cfg, params = _tiny(raw, "node", "chains_upg", epochs=3, diverge_loss_factor=1e-6,
                        diagnostics_every=0)
    summary, results, _ = _run(cfg, params, data, tmp_path, "all_failed", uri)
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert summary["status"] == "failed" and summary["reason"].startswith("every unit failed")
    parent = MlflowClient(uri).get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure_reason"] == summary["reason"]
    assert all(r["reason"] in parent.data.tags["failure_reason"] for r in results)
