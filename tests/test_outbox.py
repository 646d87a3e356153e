"""The outbox: a run's records queued on disk while its tracking server is away, sent in order later
(by the run itself, a resumed attempt, or scripts/sync_run.py). Unit tests on a SQLite store; the
outages themselves, with a real server, are in test_scaleout.py."""

from __future__ import annotations

from pathlib import Path

import mlflow
from conftest import free_port
from mlflow.tracking import MlflowClient


def test_an_outbox_keeps_records_on_disk_in_order_and_sends_them_later(tmp_path):
    from histo_transfer.tracking.outbox import Outbox

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("outbox", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    folder = tmp_path / "unsent" / run_id
    outbox = Outbox(folder, run_id, f"http://127.0.0.1:{free_port()}")  # nobody answers there
    outbox.metrics({"val_auc": 0.5}, step=1)
    outbox.metrics({"val_auc": 0.75}, step=2)
    notes = outbox.staging("notes") / "notes.txt"
    notes.write_text("kept while away")
    outbox.artifacts(notes, "notes")
    assert not outbox.close(wait_s=0)
    outbox.keep("FINISHED")

    kept = Outbox.load(folder)  # what a later process (scripts/sync_run.py) finds
    assert [item["kind"] for item in kept.pending] == ["metrics", "metrics", "artifacts"] and kept.status == "FINISHED"
    assert client.get_metric_history(run_id, "val_auc") == []  # nothing was sent
    kept.uri = store
    assert kept.close(wait_s=0)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_auc")] == [(1, 0.5), (2, 0.75)]
    assert Path(client.download_artifacts(run_id, "notes/notes.txt", str(tmp_path))).read_text() == "kept while away"
    assert not folder.exists() and not folder.parent.exists()


def test_a_resumed_run_takes_over_what_its_interrupted_attempt_had_queued(tmp_path):
    from histo_transfer.tracking import runs as tracking
    from histo_transfer.tracking.outbox import Outbox

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("resume", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    interrupted = Outbox(tmp_path / "unsent" / run_id, run_id, f"http://127.0.0.1:{free_port()}")
    interrupted.metrics({"val_auc": 0.5}, step=1)  # queued: nobody answered, then the process died
    interrupted.staging("profile")

    mlflow.set_tracking_uri(store)
    resumed = tracking.run_outbox(run_id, tmp_path)
    assert resumed.pending == [] and [m.value for m in client.get_metric_history(run_id, "val_auc")] == [0.5]
    assert resumed.staging("profile").name == "0002-profile"  # numbering goes on: no clash with the old files
