"""A whole run through `python train.py`: what MLflow holds afterwards, and the saved model."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from conftest import ROOT, TINY_MODEL, TINY_RUN, compose_config, store_overrides, write_kaggle_layout
from mlflow.tracking import MlflowClient

from histo_transfer.config.errors import DataError
from histo_transfer.tasks.train import main as train

EPOCH_METRICS = ["loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc", "lr"]


def _artifacts(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.mark.slow
def test_run_finishes_with_every_metric_per_epoch(trained_run):
    run, client = trained_run["run"], MlflowClient(trained_run["uri"])
    assert run.info.status == "FINISHED"
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    assert 0 <= run.data.metrics["best_val_auc"] <= 1
    best_epoch = int(run.data.metrics["best_epoch"])
    val_auc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_auc")}
    assert run.data.metrics["best_val_auc"] == pytest.approx(max(val_auc.values()))
    assert val_auc[best_epoch] == max(val_auc.values())
    val_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert run.data.metrics["best_val_loss"] == pytest.approx(val_loss[best_epoch])


@pytest.mark.slow
def test_a_default_console_is_quiet_and_ends_with_a_summary_that_opens_the_run(trained_run):
    """No TensorFlow C++ INFO line (run_cli gives the process no TF_CPP_MIN_LOG_LEVEL: its default holds),
    no Keras "ran out of data"; the last lines say what the run found and how to see it in the UI."""
    run, printed = trained_run["run"], trained_run["stdout"] + trained_run["stderr"]
    assert not [
        line for line in printed.splitlines() if line.startswith(("I0000", "WARNING: All log messages before absl"))]
    assert "oneDNN custom operations" not in printed and "ran out of data" not in printed
    summary = trained_run["stdout"][trained_run["stdout"].index(f"({run.info.run_id}): FINISHED"):]
    best = run.data.metrics["best_val_auc"]
    assert f"best val_auc {best:.4f} at epoch {int(run.data.metrics['best_epoch'])} of 2" in summary
    assert "128 training and 32 validation patches; weights: random" in summary
    uri = trained_run["uri"]
    assert f"scripts/mlflow_ui.sh 5000 '{uri}'" in summary
    assert f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in summary


@pytest.mark.slow
def test_run_records_config_as_dotted_params_and_its_tags(trained_run):
    run, cfg = trained_run["run"], trained_run["cfg"]
    params = run.data.params
    assert params["backbone.name"] == "tiny_cnn" and params["trainer.batch_size"] == "16"
    assert params["data.frac"] == "1.0" and params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert params["head.dropout"] == "0.2" and params["trainer.label_smoothing"] == "0.1"
    tags = run.data.tags
    assert tags["weights_source"] == "random"
    assert len(tags["dataset_fingerprint"]) == 16
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] in (head, f"{head}-dirty")
    assert run.info.run_name == ",".join(o for o in trained_run["overrides"] if not o.startswith(("tracking.", "paths.")))


def test_run_names_fit_mlflow_s_250_characters():
    from histo_transfer.tracking.runs import run_name_from_overrides

    long = [f"backbone.option_{i}=value_{i}" for i in range(20)]
    name = run_name_from_overrides([*long, "paths.output_dir=/somewhere"])
    assert len(name) == 250 and name.startswith("backbone.option_0=value_0,") and name.endswith("...")
    assert "paths." not in name
    swept = run_name_from_overrides(long, prefix="sweep ")  # a parent's name: the prefix counts too
    assert len(swept) == 250 and swept.startswith("sweep backbone.option_0=")


@pytest.mark.slow
def test_run_logs_config_plots_summary_and_models(trained_run):
    run_id, client = trained_run["run"].info.run_id, MlflowClient(trained_run["uri"])
    artifacts = set(_artifacts(client, run_id))
    assert {"config/config.yaml", "config/overrides.yaml", "plots/training_curves.png", "evaluation/roc.png",
            "evaluation/pr.png", "evaluation/reliability.png", "evaluation/confusion.png", "evaluation/metrics.json",
            "model/summary.txt", "model/model.keras"} <= artifacts
    metrics = trained_run["run"].data.metrics
    assert metrics["eval/auc_ci_low"] <= metrics["eval/auc"] <= metrics["eval/auc_ci_high"]
    config = mlflow.artifacts.load_text(f"runs:/{run_id}/config/config.yaml")
    assert "name: tiny_cnn" in config and "batch_size: 16" in config
    assert "trainer.epochs=2" in mlflow.artifacts.load_text(f"runs:/{run_id}/config/overrides.yaml")
    assert "probability" in mlflow.artifacts.load_text(f"runs:/{run_id}/model/summary.txt")
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/plots/training_curves.png")
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    grid = Image.open(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/plots/augmentation_examples.png"))
    assert grid.size == (1024, 544)  # 8 patches as stored and in 3 augmented draws (augmentation=basic)
    [logged] = mlflow.search_logged_models(experiment_ids=[trained_run["run"].info.experiment_id], output_format="list")
    assert logged.source_run_id == run_id and logged.name == "classifier"
    # artifacts live beside the SQLite database, not in the working directory
    assert (trained_run["tmp"] / "mlruns" / "artifacts").is_dir()


@pytest.mark.slow
def test_run_shows_in_the_ui_with_datasets_system_metrics_timing_and_a_description(trained_run):
    run, client = trained_run["run"], MlflowClient(trained_run["uri"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs, not GenAI
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    n = {"training": run.data.metrics["n_train"], "validation": run.data.metrics["n_val"]}
    for context, dataset in inputs.items():
        assert dataset.name == f"synthetic-{context}" and dataset.digest == run.data.tags["dataset_fingerprint"]
        assert json.loads(dataset.source)["uri"].endswith("v2_160x8") and '"label"' in dataset.schema and '"id"' in dataset.schema
        assert json.loads(dataset.profile)["num_rows"] == n[context]
    assert any(name.startswith("system/cpu_utilization") for name in run.data.metrics)
    for name in ("time/epoch_s", "throughput/train_images_per_s"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2] and all(m.value > 0 for m in history)
    note = run.data.tags["mlflow.note.content"]
    assert "**tiny_cnn**" in note and "128 training and 32 validation patches" in note
    assert f"{run.data.metrics['best_val_auc']:.4f}" in note and "s of wall time" in note


@pytest.mark.slow
def test_saved_model_loads_without_the_project_and_reproduces_predictions(trained_run, tmp_path):
    run_id = trained_run["run"].info.run_id
    path = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/model.keras", dst_path=str(tmp_path))
    patches = np.random.default_rng(0).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    np.save(tmp_path / "patches.npy", patches)
    # a fresh interpreter that imports only keras: the file must be self-contained
    script = (f"import keras, numpy as np; m = keras.models.load_model({path!r}); x = np.load({str(tmp_path)!r} + '/patches.npy');"
              f"np.save({str(tmp_path)!r} + '/u8.npy', m.predict(x, verbose=0));"
              f"np.save({str(tmp_path)!r} + '/f32.npy', m.predict(x.astype('float32'), verbose=0))")
    subprocess.run([sys.executable, "-I", "-c", script], check=True, capture_output=True, timeout=300)
    from_uint8, from_float = np.load(tmp_path / "u8.npy"), np.load(tmp_path / "f32.npy")
    assert from_uint8.shape == (6, 1) and from_uint8.dtype == np.float32
    assert np.allclose(from_uint8, from_float)
    experiment = [trained_run["run"].info.experiment_id]
    logged = mlflow.pyfunc.load_model(mlflow.search_logged_models(experiment_ids=experiment, output_format="list")[0].model_uri)
    assert np.allclose(np.asarray(logged.predict(patches.astype(np.float32))).reshape(-1, 1), from_float, atol=1e-5)


@pytest.mark.slow
def test_saved_model_is_the_best_epoch(trained_run, tmp_path):
    """Scored with the training metric, the saved model gives exactly the best epoch's val AUC."""
    import keras

    from histo_transfer.data.loading import load_training_data

    run = trained_run["run"]
    path = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model/model.keras", dst_path=str(tmp_path))
    model = keras.models.load_model(path)
    model.compile(loss="binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    data = load_training_data(trained_run["cfg"].data)
    scores = model.evaluate(data.images[data.val_indices], data.labels[data.val_indices], return_dict=True, verbose=0)
    assert scores["auc"] == pytest.approx(run.data.metrics["best_val_auc"], abs=1e-4)


def test_best_epoch_callback_restores_the_best_weights():
    import keras

    from histo_transfer.config.objective import Objective
    from histo_transfer.training.session import BestEpoch

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    best = BestEpoch(Objective("val_auc", "max"))
    best.set_model(model)
    for epoch, auc in enumerate([0.6, 0.8, 0.7]):
        model.layers[0].set_weights([np.full((1, 1), epoch, np.float32), np.zeros(1, np.float32)])
        best.on_epoch_end(epoch, {"val_auc": auc})
    best.on_train_end()
    assert (best.best_epoch, best.best_value) == (2, 0.8)
    assert model.layers[0].get_weights()[0][0, 0] == 1  # the weights of epoch 2 (index 1)


@pytest.mark.slow
def test_failed_run_ends_failed_with_the_error(tmp_path):
    ids = write_kaggle_layout(tmp_path / "kaggle", [0, 1] * 10)
    (tmp_path / "kaggle" / "train" / f"{ids[3]}.tif").write_bytes(b"broken")
    cfg = compose_config([*TINY_MODEL, *store_overrides(tmp_path), "data=kaggle", f"data.root={tmp_path / 'kaggle'}"])
    with pytest.raises(DataError, match=f"{ids[3]}.tif: corrupt"):
        train(cfg)
    [run] = MlflowClient(cfg.tracking.uri).search_runs(["1"])
    assert run.info.status == "FAILED"
    assert f"{ids[3]}.tif" in run.data.tags["error"]


@pytest.mark.slow
def test_train_returns_best_val_auc_and_honours_frac(tmp_path):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path), "data.frac=0.5", "trainer.epochs=1",
                          "tracking.run_name=half", "augmentation=strong", "optimizer=sgd"])
    best = train(cfg)
    [run] = MlflowClient(cfg.tracking.uri).search_runs(["1"])
    assert run.info.run_name == "half" and run.info.status == "FINISHED"
    assert best == pytest.approx(run.data.metrics["best_val_auc"])
    assert run.data.metrics["n_train"] + run.data.metrics["n_val"] == 80  # half of 160


@pytest.mark.slow
def test_epochs_zero_evaluates_the_untrained_model(tmp_path):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path), "trainer.epochs=0"])
    best = train(cfg)
    [run] = MlflowClient(cfg.tracking.uri).search_runs(["1"])
    assert run.info.status == "FINISHED" and run.data.metrics["best_epoch"] == 0
    assert best == pytest.approx(run.data.metrics["best_val_auc"])
    for name in ("val_loss", "val_accuracy", "val_auc"):
        [point] = MlflowClient(cfg.tracking.uri).get_metric_history(run.info.run_id, name)
        assert point.step == 0 and point.value == pytest.approx(run.data.metrics[f"best_{name}"])


@pytest.mark.slow
def test_skip_policy_trains_without_bad_images_and_lists_them(tmp_path):
    root = tmp_path / "kaggle"
    ids = write_kaggle_layout(root, [0, 1] * 20)
    (root / "train" / f"{ids[5]}.tif").write_bytes(b"broken")
    (root / "train" / "stray.tif").write_bytes((root / "train" / f"{ids[0]}.tif").read_bytes())
    cfg = compose_config([*TINY_MODEL, *store_overrides(tmp_path), "data=kaggle", f"data.root={root}",
                          "data.on_bad_image=skip", "trainer.epochs=1"])
    train(cfg)
    [run] = MlflowClient(cfg.tracking.uri).search_runs(["1"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_bad_images"] == 1 and run.data.metrics["n_unlisted_files"] == 1
    assert run.data.metrics["n_train"] + run.data.metrics["n_val"] == 39
    bad = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/bad_images.tsv")
    assert bad.startswith(f"{ids[5]}\t") and "corrupt" in bad
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/unlisted_files.txt") == "stray.tif\n"
