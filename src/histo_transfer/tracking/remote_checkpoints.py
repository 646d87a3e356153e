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
from typing import Callable

from mlflow.tracking import MlflowClient

from histo_transfer.tracking.outbox import Outbox
from histo_transfer.tracking.redaction import redact_uri
from histo_transfer.tracking.schema import CHECKPOINTS_DIR, CONFIG_TAG
from histo_transfer.training.checkpoints import PROGRESS_FILE, Checkpoints, ResumeState, intact

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


def find(experiment_id: str, key: str, local_run_id: str | None = None,
         ended: Callable[[str], bool] = lambda run_id: False) -> RemoteStates | None:
    """The uploaded states of this config's latest unfinished run that has any (reading their progress
    files only); None when there is none, or when the run `local_run_id` (this machine's state) is
    later than every run that has. `ended(run_id)`: a run that ended here, its end not yet sent."""
    client = MlflowClient()
    runs = client.search_runs([experiment_id], f"tags.{CONFIG_TAG} = '{key}' and attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        if ended(run.info.run_id):
            continue
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
        if run.info.run_id == local_run_id:  # the latest attempt is this machine's
            return None
    return None


def resume_state(experiment_id: str, key: str, checkpoints: Checkpoints, local: ResumeState | None,
                 ended: Callable[[str], bool] = lambda run_id: False) -> ResumeState | None:
    """The state to resume from: the local one, unless the server holds a later one of the same run or
    any of a later attempt (another machine trained on after this one stopped); those are taken in,
    once one of them is found intact."""
    local_run = local.progress.run_id if local is not None else None
    remote = find(experiment_id, key, local_run, ended)
    if remote is None or (remote.run_id == local_run and local.progress.epoch >= remote.last):
        return local
    newer_than = local.progress.epoch if remote.run_id == local_run else 0
    client = MlflowClient()
    checkpoint_dir = checkpoints.folder.parent
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=checkpoint_dir, prefix=".download-") as scratch:
        fetched = [Path(client.download_artifacts(remote.run_id, slot, scratch))
                   for slot, epoch in sorted(remote.epochs.items(), key=lambda item: item[1]) if epoch > newer_than]
        if not any(intact(folder) for folder in fetched):
            log.warning("the tracking server's states of run %s (epochs %s) are damaged: resuming from %s",
                        remote.run_id, ", ".join(map(str, sorted(remote.epochs.values()))),
                        f"this machine's epoch {local.progress.epoch}" if local else "scratch")
            return local
        if remote.run_id != local_run:
            checkpoints.clear()  # an earlier attempt's states: they must not mix with the later one's
        taken = [epoch for epoch in map(checkpoints.adopt, fetched) if epoch is not None]
    log.info("the states of epoch(s) %s of run %s come from the tracking server %s (the local folder %s had %s)",
             ", ".join(map(str, taken)), remote.run_id, redact_uri(client.tracking_uri), checkpoint_dir,
             f"epoch {local.progress.epoch} of run {local_run}" if local is not None else "none")
    if remote.status == "RUNNING":
        log.warning("run %s is still RUNNING on the tracking server: if its job were alive on another machine, "
                    "both would write to it", remote.run_id)
    return checkpoints.latest()
