"""Training state on disk: the last two epochs kept, each with checksums; a damaged one is passed over."""

from __future__ import annotations

import json
import shutil
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


def test_uploaded_states_come_back_where_they_are_later_than_the_local_ones(tmp_path, caplog):
    """tracking.upload_checkpoints on a SQLite store (the HTTP path: test_scaleout.py's scancel test):
    the last two states go into the run's artifacts; a machine with no state, or an older one, takes
    them back; a slot that an upload cut short falls back to the other; a finished run's are deleted."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from histo_transfer.tracking import remote_checkpoints
    from histo_transfer.tracking.outbox import Outbox
    from histo_transfer.tracking.schema import CHECKPOINTS_DIR, CONFIG_TAG

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("uploads", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, tags={CONFIG_TAG: "key"}).info.run_id
    outbox = Outbox(tmp_path / "unsent" / run_id, run_id, store)
    uploads = remote_checkpoints.CheckpointUploads(outbox)
    here, weights = Checkpoints(tmp_path / "here", "key"), {}
    for epoch in (1, 2, 3, 4):
        model = tiny_model(epoch)
        uploads(here.save(model, [w * 2 for w in model.get_weights()], Progress(run_id=run_id, epoch=epoch)), epoch)
        weights[epoch] = model.get_weights()
        if epoch == 2:  # a machine that stopped here, while another trained on
            behind = Checkpoints(tmp_path / "behind", "key")
            shutil.copytree(here.folder, behind.folder)
    slots = tmp_path / "artifacts" / run_id / "artifacts" / CHECKPOINTS_DIR
    assert sorted(p.name for p in slots.iterdir()) == ["slot_0", "slot_1"]  # epochs 4 and 3, as kept here
    (slots / "slot_0" / "stray.bin").write_bytes(b"x")  # not listed in its checksums

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        here_state = here.latest()  # as recent as the server's: stays
        assert remote_checkpoints.resume_state(experiment, "key", here, here_state) is here_state

        elsewhere = Checkpoints(tmp_path / "elsewhere", "key")
        with caplog.at_level(logging.INFO):
            resumed = remote_checkpoints.resume_state(experiment, "key", elsewhere, None)
        assert f"the states of epoch(s) 3, 4 of run {run_id} come from the tracking server" in caplog.text
        assert resumed.progress.epoch == 4 and resumed.progress.run_id == run_id
        assert all(np.array_equal(a, b) for a, b in zip(resumed.model().get_weights(), weights[4]))
        assert all(np.array_equal(a, 2 * b) for a, b in zip(resumed.best_weights(), weights[4]))
        assert not list(elsewhere.folder.rglob("stray.bin")) and not list(elsewhere.folder.glob(".*"))

        resumed = remote_checkpoints.resume_state(experiment, "key", behind, behind.latest())  # had epoch 2
        assert resumed.progress.epoch == 4 and all(
            np.array_equal(a, b) for a, b in zip(resumed.model().get_weights(), weights[4]))

        state = slots / "slot_0" / MODEL_FILE  # an upload of epoch 4 cut short
        state.write_bytes(state.read_bytes()[:100])
        third = Checkpoints(tmp_path / "third", "key")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert remote_checkpoints.resume_state(experiment, "key", third, None).progress.epoch == 3
        assert f"{third.folder / 'epoch_0004'} is damaged ({MODEL_FILE} does not match its checksum)" in caplog.text

        # a later attempt of this machine's that uploaded nothing yet: its own state stands
        later = client.create_run(experiment, tags={CONFIG_TAG: "key"}).info.run_id
        mine = Checkpoints(tmp_path / "mine", "key")
        mine.save(tiny_model(9), None, Progress(run_id=later, epoch=1))
        assert remote_checkpoints.resume_state(experiment, "key", mine, mine.latest()).progress.run_id == later
        client.set_terminated(later, "KILLED")
        # a run that ended here, its end still waiting for sync_run.py, is not resumed
        assert remote_checkpoints.find(experiment, "key", ended=lambda run: run == run_id) is None

        outbox.delete_artifacts(CHECKPOINTS_DIR)  # what a run queues once it has finished
        assert outbox.close(wait_s=0) and client.list_artifacts(run_id, CHECKPOINTS_DIR) == []
        client.set_terminated(run_id, "FINISHED")
        assert remote_checkpoints.resume_state(experiment, "key", Checkpoints(tmp_path / "4th", "key"), None) is None
    finally:
        mlflow.set_tracking_uri(previous)


def test_while_the_server_is_away_only_the_newest_state_of_a_slot_waits_and_a_finished_run_drops_them(tmp_path):
    from conftest import free_port

    from histo_transfer.tracking.outbox import Outbox
    from histo_transfer.tracking.remote_checkpoints import CheckpointUploads

    outbox = Outbox(tmp_path / "unsent", "run", f"http://127.0.0.1:{free_port()}")  # nobody answers there
    here = Checkpoints(tmp_path / "here", "key")
    for epoch in (1, 2, 3):
        CheckpointUploads(outbox)(here.save(tiny_model(epoch), None, Progress(run_id="run", epoch=epoch)), epoch)
    outbox.metrics({"val_auc": 0.5}, step=3)
    waiting = sorted((item["artifact_path"], item["path"]) for item in outbox.pending if "path" in item)
    assert waiting == [("checkpoints/slot_0", "files/0002-checkpoint-0002"), ("checkpoints/slot_1", "files/0003-checkpoint-0003")]
    assert sorted(p.name for p in (tmp_path / "unsent" / "files").iterdir()) == ["0002-checkpoint-0002", "0003-checkpoint-0003"]

    outbox.delete_artifacts("checkpoints")  # finished while away: the uploads go, the deletion waits (sync_run.py)
    assert [item["kind"] for item in outbox.pending] == ["metrics", "delete_artifacts"]
    assert not (tmp_path / "unsent" / "files").exists() or not list((tmp_path / "unsent" / "files").iterdir())
