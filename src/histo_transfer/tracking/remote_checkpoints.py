"""A run's epoch checkpoints kept among its artifacts too (`tracking.upload_checkpoints`), so that
`trainer.resume=true` continues it on a machine that lacks the checkpoint folder, or holds an older
one: a cluster node with no shared file system, a pre-empted job rescheduled elsewhere. They go up
through the run's outbox after every epoch (queued while the server is away) and come down through
the server's artifact proxy; the outbox deletes them once the run has finished.

Two slots, checkpoints/slot_0 and checkpoints/slot_1 by the epoch's parity, hold the last two states,
as the local folder does. An upload cut short leaves a slot whose checksums do not match: resuming
reports it and falls back to the other (training.checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from histo_transfer.tracking.outbox import Outbox
from histo_transfer.tracking.redaction import redact_uri
from histo_transfer.tracking.schema import CHECKPOINTS_DIR, CONFIG_TAG
from histo_transfer.training.checkpoints import PROGRESS_FILE, Checkpoints, ResumeState

log = logging.getLogger(__name__)


def uploads_wanted(setting: bool | None, uri: str) -> bool:
    """tracking.upload_checkpoints: true / false as said; null when the store is a server (over HTTP,
    the machine that resumes may well be another one)."""
    return setting if setting is not None else uri.startswith(("http://", "https://"))


class CheckpointUploads:
    """EpochCheckpoint's mirror: each saved state folder into the run's artifacts, through `outbox`."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox

    def __call__(self, folder: Path, epoch: int) -> None:
        staging = self.outbox.staging(f"checkpoint-{epoch:04d}")
        for path in folder.iterdir():
            try:  # the same bytes at no cost in space; the state folder may be deleted before they are sent
                os.link(path, staging / path.name)
            except OSError:
                shutil.copy2(path, staging / path.name)
        # a refused upload (a proxy's size limit) costs a warning, not the training
        self.outbox.artifacts(staging, f"{CHECKPOINTS_DIR}/slot_{epoch % 2}", supersedes=True, optional=True)


@dataclass
class RemoteStates:
    """The uploaded states of one run: the epoch each slot holds, by its progress file."""

    run_id: str
    status: str
    epochs: dict[str, int]  # artifact path of the slot -> epoch

    @property
    def last(self) -> int:
        return max(self.epochs.values())


def find(experiment_id: str, key: str) -> RemoteStates | None:
    """The uploaded states of this config's latest unfinished run that has any (reading their progress
    files only); None when there is none."""
    client = MlflowClient()
    runs = client.search_runs([experiment_id], f"tags.{CONFIG_TAG} = '{key}' and attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        epochs = {}
        with tempfile.TemporaryDirectory(prefix="histo-progress-") as scratch:
            for slot in (item.path for item in client.list_artifacts(run.info.run_id, CHECKPOINTS_DIR) if item.is_dir):
                try:
                    progress = client.download_artifacts(run.info.run_id, f"{slot}/{PROGRESS_FILE}", scratch)
                    epochs[slot] = int(json.loads(Path(progress).read_text())["epoch"])
                except Exception:  # a slot whose upload never reached its progress file: not a state
                    continue
        if epochs:
            return RemoteStates(run.info.run_id, run.info.status, epochs)
    return None


def resume_state(experiment_id: str, key: str, checkpoints: Checkpoints, local: ResumeState | None) -> ResumeState | None:
    """The state to resume from: the local one, unless the server holds a later one of the same run or
    any of a later attempt (another machine trained on after this one stopped); those are taken in."""
    remote = find(experiment_id, key)
    if remote is None:
        return local
    if local is not None and local.progress.run_id == remote.run_id and local.progress.epoch >= remote.last:
        return local
    if local is not None and local.progress.run_id != remote.run_id:
        checkpoints.clear()  # another attempt's states: they must not mix with those taken in
    newer_than = local.progress.epoch if local is not None and local.progress.run_id == remote.run_id else 0
    client = MlflowClient()
    checkpoints.folder.mkdir(parents=True, exist_ok=True)
    taken = []
    with tempfile.TemporaryDirectory(dir=checkpoints.folder, prefix=".download-") as scratch:
        for slot, epoch in sorted(remote.epochs.items(), key=lambda item: item[1]):
            if epoch > newer_than:
                folder = Path(client.download_artifacts(remote.run_id, slot, scratch))
                if checkpoints.adopt(folder) is not None:
                    taken.append(epoch)
    if not taken:
        return local
    elsewhere = ("; it is still RUNNING there: were its job alive on another machine, both would write to it"
                 if remote.status == "RUNNING" else "")
    log.info("the states of epoch(s) %s of run %s come from the tracking server %s (the local folder %s had %s)%s",
             ", ".join(map(str, taken)), remote.run_id, redact_uri(client.tracking_uri), checkpoints.folder.parent,
             f"epoch {local.progress.epoch}" if local is not None else "none", elsewhere)
    return checkpoints.latest()
