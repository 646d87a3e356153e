"""A run's epoch checkpoints kept among its artifacts too (`tracking.upload_checkpoints`), so that
`trainer.resume=true` continues it on a machine that lacks the checkpoint folder: a cluster node with
no shared file system, a pre-empted job rescheduled elsewhere. They go up through the run's outbox
after every epoch (queued while the server is away) and come down through the server's artifact
proxy; the run's artifacts lose them once it finishes.

Two slots, checkpoints/slot_0 and checkpoints/slot_1 by the epoch's parity, hold the last two states,
as the local folder does. An upload cut short leaves a slot whose checksums do not match: resuming
reports it and falls back to the other (training.checkpoints).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from histo_transfer.tracking.outbox import Outbox
from histo_transfer.tracking.redaction import redact_uri
from histo_transfer.tracking.schema import CHECKPOINTS_DIR, CONFIG_TAG
from histo_transfer.training.checkpoints import Checkpoints

log = logging.getLogger(__name__)

UNFINISHED = ("RUNNING", "KILLED", "FAILED")  # the runs whose state is worth resuming


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
        self.outbox.artifacts(staging, f"{CHECKPOINTS_DIR}/slot_{epoch % 2}", supersedes=True)


def download(experiment_id: str, key: str, checkpoints: Checkpoints) -> str | None:
    """The uploaded states of this config's latest unfinished run, taken into `checkpoints`' folder;
    returns that run's id, or None when no such run holds any."""
    client = MlflowClient()
    runs = client.search_runs([experiment_id], f"tags.{CONFIG_TAG} = '{key}'", order_by=["attributes.start_time DESC"],
                              max_results=20)
    for run in (r for r in runs if r.info.status in UNFINISHED):
        if not client.list_artifacts(run.info.run_id, CHECKPOINTS_DIR):
            continue
        checkpoints.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=checkpoints.folder, prefix=".download-") as scratch:
            local = Path(client.download_artifacts(run.info.run_id, CHECKPOINTS_DIR, scratch))
            epochs = sorted(filter(None, (checkpoints.adopt(slot) for slot in sorted(local.iterdir()))))
        if epochs:
            log.info("no state of this config in %s: the states of epoch(s) %s of run %s come from the tracking "
                     "server %s", checkpoints.folder.parent, ", ".join(map(str, epochs)), run.info.run_id,
                     redact_uri(client.tracking_uri))
            return run.info.run_id
    return None


def remove(run_id: str, experiment: str) -> None:
    """A finished run's uploaded states, deleted from its artifacts. A user who may not delete artifacts
    (EDIT without MANAGE on a server with --auth) leaves them there: said once, never an error."""
    client = MlflowClient()
    if not client.list_artifacts(run_id, CHECKPOINTS_DIR):
        return
    try:
        get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(CHECKPOINTS_DIR)
    except (MlflowException, OSError) as exc:
        refused = "403" in str(exc) or "PERMISSION_DENIED" in str(exc)
        log.warning("the last checkpoints of run %s stay among its artifacts (%s/): %s", run_id, CHECKPOINTS_DIR,
                    f"deleting artifacts needs MANAGE on experiment '{experiment}'" if refused
                    else str(exc).splitlines()[0])
