"""Training state on disk: the last two epochs kept, each with checksums; a damaged one is passed over."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np

from histo_transfer.training.checkpoints import CHECKSUMS_FILE, MODEL_FILE, Checkpoints, Progress


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def save_epochs(checkpoints: Checkpoints, epochs: int) -> dict[int, list]:
    weights = {}
    for epoch in range(1, epochs + 1):
        model = tiny_model(epoch)
        checkpoints.save(model, None, Progress(run_id="r", epoch=epoch))
        weights[epoch] = model.get_weights()
    return weights


def test_only_the_last_two_epochs_are_kept_each_with_a_checksum_per_file(tmp_path):
    checkpoints = Checkpoints(tmp_path, "key")
    save_epochs(checkpoints, 3)
    kept = sorted(p.name for p in checkpoints.folder.iterdir())
    assert kept == ["epoch_0002", "epoch_0003"]
    sums = json.loads((checkpoints.folder / "epoch_0003" / CHECKSUMS_FILE).read_text())
    assert sorted(sums) == ["progress.json", MODEL_FILE] and all(len(v) == 64 for v in sums.values())
    assert checkpoints.latest().progress.epoch == 3


def test_a_truncated_state_is_reported_and_the_epoch_before_is_resumed(tmp_path, caplog):
    checkpoints = Checkpoints(tmp_path, "key")
    weights = save_epochs(checkpoints, 3)
    state = checkpoints.folder / "epoch_0003" / MODEL_FILE
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        resumed = checkpoints.latest()
    assert resumed.progress.epoch == 2
    assert all(np.array_equal(a, b) for a, b in zip(resumed.model().get_weights(), weights[2]))
    assert f"{checkpoints.folder / 'epoch_0003'} is damaged ({MODEL_FILE} does not match its checksum)" in caplog.text

    (checkpoints.folder / "epoch_0002" / MODEL_FILE).unlink()  # both damaged: nothing to resume, said so
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.latest() is None
    assert f"({MODEL_FILE} missing): no earlier state is left" in caplog.text


def test_states_are_ordered_by_epoch_number_and_a_discarded_future_is_pruned(tmp_path):
    checkpoints = Checkpoints(tmp_path, "key")
    save_epochs(checkpoints, 2)
    (checkpoints.folder / "epoch_0002").rename(checkpoints.folder / "epoch_9999")  # a later epoch, stale
    checkpoints.save(tiny_model(0), None, Progress(run_id="r", epoch=10000))
    assert checkpoints.latest().progress.epoch == 10000  # epoch_10000 comes after epoch_9999
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["epoch_10000", "epoch_9999"]
    checkpoints.save(tiny_model(0), None, Progress(run_id="r", epoch=1))  # a run resumed from before them
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["epoch_0001"]  # later states: gone
    checkpoints.save(tiny_model(0), None, Progress(run_id="r", epoch=2))
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["epoch_0001", "epoch_0002"]
