"""The training session's own pieces: BatchNorm recalibration, Ctrl-C between batches, debug configs."""

from __future__ import annotations

import os
import signal

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_RUN, compose_config, run_cli, store_overrides
from mlflow.tracking import MlflowClient

from histo_transfer.tasks.train import main as train
from histo_transfer.data.loading import load_training_data
from histo_transfer.training.session import BatchNormRecalibration, TrainingSession, interrupt_between_batches


def test_recalibration_sets_moving_statistics_to_the_mean_of_training_batches():
    inputs = keras.Input((3,))
    frozen = keras.layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    outputs = keras.layers.BatchNormalization(momentum=0.99, name="trains")(frozen(inputs))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, 2.0, (64, 3)).astype(np.float32) for loc in (4.0, 6.0)]
    dataset = tf.data.Dataset.from_tensor_slices((np.stack(batches), np.zeros((2, 64, 1), np.float32)))
    callback = BatchNormRecalibration(lambda epoch: dataset)
    callback.set_model(model)
    callback.on_epoch_begin(0)
    callback.on_test_begin()
    # the plain mean of the batches (not 0.99-smoothed), as the frozen layer passes them on (x / sqrt(1 + eps))
    expected = np.mean([batch.mean(axis=0) for batch in batches], axis=0) / np.sqrt(1 + frozen.epsilon)
    assert np.allclose(model.get_layer("trains").moving_mean.numpy(), expected, atol=1e-4)
    assert np.allclose(model.get_layer("frozen").moving_mean.numpy(), 0)  # frozen: untouched
    assert model.get_layer("trains").momentum == 0.99  # restored
    callback.on_test_begin()  # an evaluate() outside fit, or a second one in the epoch: nothing recomputed
    assert np.allclose(model.get_layer("trains").moving_mean.numpy(), expected, atol=1e-4)


def test_ctrl_c_is_raised_at_the_next_batch_boundary_and_never_lost():
    with pytest.raises(KeyboardInterrupt):
        with interrupt_between_batches() as stop:
            os.kill(os.getpid(), signal.SIGINT)  # noticed, not raised where it lands
            stop.on_train_batch_end(0)
    # noticed after the last batch of fit: still raised when training ends
    with pytest.raises(KeyboardInterrupt):
        with interrupt_between_batches():
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back


def test_progress_is_a_bar_in_a_terminal_and_one_line_per_epoch_in_logs(monkeypatch):
    import sys

    from histo_transfer.training.session import progress_verbosity

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert progress_verbosity("auto") == 1  # Keras' per-step bar with rate and ETA
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert progress_verbosity("auto") == 2  # one line per epoch: logs and CI
    assert (progress_verbosity("bar"), progress_verbosity("epoch"), progress_verbosity("none")) == (1, 2, 0)


@pytest.mark.slow
def test_debug_fast_gives_a_real_validation_auc_on_the_default_model(tmp_path):
    """MobileNetV2 from random initialisation, 5 steps: without BatchNorm recalibration its validation
    output was one constant (val AUC exactly 0.5)."""
    result = run_cli(["debug=fast", *store_overrides(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs(["1"])
    assert run.data.params["backbone.name"] == "mobilenetv2" and run.data.tags["debug"] == "fast"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1]
    assert run.data.metrics["n_train"] == 320  # a fifth of the 2,000 built-in patches, less validation
    assert run.data.metrics["best_val_auc"] > 0.6


@pytest.mark.slow
def test_debug_overfit_drives_the_loss_down_on_one_batch(tmp_path):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path), "debug=overfit", "trainer.epochs=30",
                          "optimizer.lr=0.01"])
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    [run] = client.search_runs(["1"])
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 30 and run.data.metrics["n_train"] > 16  # the data is larger; one batch is used
    assert loss[-1] < 0.6 * loss[0]
    assert run.data.metrics["best_val_auc"] > 0.9  # validated on the batch it learnt


@pytest.mark.slow
def test_debug_profile_logs_a_profiler_trace(tmp_path):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path), "debug=profile"])
    train(cfg)
    [run] = MlflowClient(cfg.tracking.uri).search_runs(["1"])
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="profile",
                                                 dst_path=str(tmp_path / "profile"), tracking_uri=cfg.tracking.uri)
    traces = [name for _, _, names in os.walk(folder) for name in names if name.endswith(".xplane.pb")]
    assert traces and all(os.path.getsize(os.path.join(r, n)) > 0 for r, _, ns in os.walk(folder) for n in ns)


def test_steps_per_epoch_gives_every_data_size_the_same_optimizer_steps(tmp_path):
    """What an honest learning curve over data.frac needs: the data size the only thing that changes."""
    def steps(*overrides):
        cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path), *overrides])
        return TrainingSession(cfg, load_training_data(cfg.data)).steps

    assert steps() == 8  # one pass: 128 training patches in batches of 16
    assert steps("data.frac=0.25", "trainer.steps_per_epoch=20") == steps("trainer.steps_per_epoch=20") == 20
    assert steps("trainer.steps_per_epoch=3") == 3  # debug=fast's short epochs
