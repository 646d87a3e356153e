"""Searches: grid and Optuna sweeps as one MLflow parent with nested jobs, keras-tuner, parallel jobs,
and the launcher configs for going past one machine."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
from conftest import CONF_DIR, TINY_RUN, compose_config, run_cli, store_overrides
from mlflow.tracking import MlflowClient

from histo_transfer.config.errors import ConfigError
from histo_transfer.config.objective import Objective
from histo_transfer.tasks.train import main as train
from histo_transfer.tracking.parent_runs import ParentRun

TINY_SWEEP = [o for o in TINY_RUN if not o.startswith("trainer.epochs")] + ["trainer.epochs=1"]


def sweep_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs(["1"], max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("kind") in ("sweep", "keras-tuner")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def summary(client, parent):
    path = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="summary/sweep_summary.csv",
                                               tracking_uri=client.tracking_uri)
    return pd.read_csv(path)


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A 2x2 grid sweep of the tiny model, one epoch a job, through `python train.py -m`."""
    tmp = tmp_path_factory.mktemp("grid")
    result = run_cli(["-m", *TINY_SWEEP, *store_overrides(tmp), "tracking.register_best=sweep-best",
                      "optimizer.lr=0.001,0.01", "augmentation=none,basic"])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_grid_sweep_is_one_parent_with_nested_jobs_and_a_summary(grid_sweep):
    tmp_path = grid_sweep
    client, parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {(c.data.params["optimizer.lr"], c.data.params["augmentation.name"]) for c in children} == {
        ("0.001", "none"), ("0.001", "basic"), ("0.01", "none"), ("0.01", "basic")}
    assert "optimizer.lr=0.001,0.01" in parent.data.tags["sweep_overrides"]
    assert parent.data.tags["sweep_dir"].startswith(str(tmp_path / "multirun"))  # paths.output_dir
    table = summary(client, parent)
    assert len(table) == 4 and table["best"].sum() == 1
    best = max(children, key=lambda c: c.data.metrics["best_val_auc"])
    assert table.loc[table["best"], "run_id"].item() == best.info.run_id
    assert parent.data.tags["best_child_run_id"] == best.info.run_id
    assert client.get_run(best.info.run_id).data.tags["best_in_sweep"] == "true"
    assert parent.data.tags["best.optimizer.lr"] == best.data.params["optimizer.lr"]
    assert {"summary/sweep_summary.csv", "summary/sweep_summary.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    note = parent.data.tags["mlflow.note.content"]  # the parent's description in the UI
    assert f"run `{best.info.run_id}`" in note and note.count("| FINISHED |") == 4
    champion = client.get_model_version_by_alias("sweep-best", "champion")  # tracking.register_best
    assert champion.run_id == best.info.run_id


@pytest.mark.slow
def test_a_sweep_parent_stands_for_its_best_jobs(grid_sweep):
    from histo_transfer.tracking.registry import member_refs
    from histo_transfer.workflows.comparison import cv_runs_of

    client, parent, children = sweep_runs(grid_sweep)
    mlflow.set_tracking_uri(client.tracking_uri)
    auc = {job.info.run_id: job.data.metrics["best_val_auc"] for job in children}
    best = member_refs(parent.info.run_id, top_k=2)
    assert len(set(best)) == 2 and [auc[ref] for ref in best] == sorted(auc.values(), reverse=True)[:2]  # ties allowed
    with pytest.raises(ConfigError, match=f"sweep {parent.info.run_id} has no finished cross-validation"):
        cv_runs_of(parent.info.run_id)  # compare_cv needs out-of-fold predictions; these jobs have none


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_into_the_same_parent_and_keeps_its_finished_jobs(tmp_path):
    command = ["-m", *TINY_SWEEP, *store_overrides(tmp_path), "optimizer.lr=0.001,0.01"]
    result = run_cli(command)
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = sweep_runs(tmp_path)
    first, second = sorted(children, key=lambda run: run.info.start_time)
    # what Ctrl-C in the second job's first epoch leaves: that job and the sweep KILLED, no epoch saved
    client.set_terminated(second.info.run_id, "KILLED")
    client.set_terminated(parent.info.run_id, "KILLED")

    result = run_cli([*command, "trainer.resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    client, again, children = sweep_runs(tmp_path)  # still exactly one sweep parent
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    runs = sorted(children, key=lambda run: run.info.start_time)
    assert [(r.info.run_id, r.info.status) for r in runs[:2]] == [(first.info.run_id, "FINISHED"),
                                                                  (second.info.run_id, "KILLED")]
    [rerun] = runs[2:]  # the finished job kept, not trained again; the killed one run anew
    assert rerun.info.status == "FINISHED" and rerun.data.params["optimizer.lr"] == "0.01"
    assert set(summary(client, again)["run_id"]) == {r.info.run_id for r in runs}
    finished = [first, rerun]
    assert again.data.tags["best_child_run_id"] == max(finished, key=lambda r: r.data.metrics["best_val_auc"]).info.run_id


@pytest.mark.slow
@pytest.mark.parametrize("children, ends", [(["FINISHED", "KILLED"], "KILLED"), (["KILLED", "FAILED"], "FAILED"),
                                            ([], "FAILED")])
def test_a_parent_its_process_left_running_ends_killed_after_ctrl_c_else_failed(tmp_path, children, ends):
    # at exit (atexit): Ctrl-C ends the training run KILLED, so a KILLED latest child means an interruption
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # over any store an earlier test set
    client = MlflowClient()
    experiment = client.create_experiment("sweeps")
    parent = ParentRun.create(experiment, "sweep", {"kind": "sweep"}, Objective(), only_this_process=False)
    for started, status in enumerate(children, start=1):
        child = client.create_run(experiment, start_time=started * 1000, tags=parent.child_tags)
        client.set_terminated(child.info.run_id, status)
    parent.end_if_running()
    assert client.get_run(parent.run_id).info.status == ends
    parent.end_if_running()  # a parent that has ended keeps its status
    assert client.get_run(parent.run_id).info.status == ends


@pytest.mark.slow
def test_a_recorded_parent_counts_only_while_the_store_holds_it(tmp_path):
    from histo_transfer.tracking.parent_runs import record_parent, recorded_parent

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # over any store an earlier test set
    record = tmp_path / "state" / "parent"
    assert recorded_parent(record) is None  # nothing recorded yet
    parent = ParentRun.create(MlflowClient().create_experiment("sweeps"), "sweep", {"kind": "sweep"}, Objective())
    record_parent(record, parent)
    assert recorded_parent(record) == parent.run_id
    parent.end()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'another.db'}")  # the record outlived its store
    assert recorded_parent(record) is None


@pytest.mark.slow
def test_epochs_zero_compares_backbones(tmp_path):
    tiny = [o for o in TINY_SWEEP if not o.startswith("backbone")]
    result = run_cli(["-m", *tiny, *store_overrides(tmp_path), "trainer.epochs=0",
                      "backbone=tiny_cnn,mobilenet_v1", "backbone.weights=null"])
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = sweep_runs(tmp_path)
    table = summary(client, parent).set_index("backbone.name")
    assert sorted(table.index) == ["mobilenet_v1", "tiny_cnn"]
    for child in children:
        row = table.loc[child.data.params["backbone.name"]]
        assert child.data.metrics["best_epoch"] == 0
        for metric in ("best_val_loss", "best_val_accuracy", "best_val_auc"):
            assert row[metric] == pytest.approx(child.data.metrics[metric])


@pytest.mark.slow
def test_optuna_search_over_the_learning_rate(tmp_path):
    result = run_cli([*TINY_SWEEP, *store_overrides(tmp_path), "hparams_search=lr_optuna", "hydra.sweeper.n_trials=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert "optimizer.lr=tag(log, interval(0.00001, 0.1))" in parent.data.tags["sweep_search_space"]
    rates = [float(c.data.params["optimizer.lr"]) for c in children]
    assert all(1e-5 <= r <= 0.1 for r in rates) and len(set(rates)) == 2
    best = max(children, key=lambda c: c.data.metrics["best_val_auc"])
    assert math.isclose(float(parent.data.tags["best.optimizer.lr"]), float(best.data.params["optimizer.lr"]))
    assert parent.data.metrics["best_val_auc"] == pytest.approx(best.data.metrics["best_val_auc"])


@pytest.mark.slow
def test_8_parallel_jobs_write_one_sqlite_store_at_once(tmp_path):
    """A busy store: 8 joblib workers record into one SQLite file together (MLflow waits up to 20 s for
    SQLite's write lock, PRAGMA busy_timeout, so none fails with "database is locked")."""
    seeds = [str(seed) for seed in range(1, 9)]
    result = run_cli(["-m", *TINY_SWEEP, *store_overrides(tmp_path), "hydra/launcher=parallel", "hydra.launcher.n_jobs=8",
                      f"trainer.seed={','.join(seeds)}"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stderr + result.stdout
    client, parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_jobs"] == 8
    assert sorted(c.data.params["trainer.seed"] for c in children) == seeds  # none lost or doubled
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in ("loss", "auc", "val_loss", "val_auc", "lr"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == [1], metric
        assert "best_val_auc" in child.data.metrics


@pytest.mark.slow
def test_keras_tuner_search_nests_trials_and_resumes(tmp_path):
    overrides = [*TINY_SWEEP, *store_overrides(tmp_path), "tuner=random", "tuner.max_trials=2",
                 f"tuner.directory={tmp_path / 'kt'}"]
    best = train(compose_config(overrides))
    client, parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {c.data.tags["kind"] for c in children} == {"trial"}
    assert all(1e-5 <= float(c.data.params["hp.lr"]) <= 0.1 for c in children)
    assert best == pytest.approx(max(c.data.metrics["best_val_auc"] for c in children))
    top = max(c.data.metrics["best_val_auc"] for c in children)
    best_rates = {float(c.data.params["hp.lr"]) for c in children if c.data.metrics["best_val_auc"] == pytest.approx(top)}
    assert any(float(parent.data.tags["best.hp.lr"]) == pytest.approx(rate) for rate in best_rates)  # ties allowed
    # resume with a larger budget: the two finished trials are kept, one more runs, same parent
    train(compose_config([*overrides[:-2], "tuner.max_trials=3", f"tuner.directory={tmp_path / 'kt'}"]))
    client, parent_again, children = sweep_runs(tmp_path)
    assert parent_again.info.run_id == parent.info.run_id and len(children) == 3


def test_launcher_configs_compose_against_their_plugins():
    """Composing checks each key against the plugin's own schema; the launcher classes must import."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        parallel = compose("config", overrides=["hydra/launcher=parallel"], return_hydra_config=True)
        ray = compose("config", overrides=["hydra/launcher=ray"], return_hydra_config=True)
    assert get_class(slurm.hydra.launcher._target_).__name__ == "SlurmLauncher"
    assert get_class(parallel.hydra.launcher._target_).__name__ == "JoblibLauncher"
    assert get_class(ray.hydra.launcher._target_).__name__ == "RayLauncher"  # the dev extra installs it


@pytest.mark.slow
def test_a_sweep_over_data_frac_plots_a_learning_curve(tmp_path):
    result = run_cli(["-m", *TINY_SWEEP, *store_overrides(tmp_path), "data.frac=0.25,1.0"])
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = sweep_runs(tmp_path)
    table = summary(client, parent).sort_values("n_train")
    assert table["data.frac"].tolist() == [0.25, 1.0] and table["n_train"].tolist() == [32, 128]
    path = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="summary/learning_curve.png",
                                               tracking_uri=client.tracking_uri)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
