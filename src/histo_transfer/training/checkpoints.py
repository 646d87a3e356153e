"""Resumable training state: after every epoch, the model with its optimizer, the best epoch's
weights, the sum of the epochs averaged so far (trainer.swa) and the run's progress, written as one folder that appears whole or not at all, with a
checksum of each file. The last two epochs are kept: a state that a crash, a full disk or a bad
sector left damaged is found by its checksums, and resuming falls back to the one before.

A run is identified by its config's key (config.identity.run_key), so the same command with
trainer.resume=true finds the state that an interrupted run left. Each saved folder can also be handed
on (EpochCheckpoint's `mirror`: the tracking server's copy), and a folder that comes back from there
is taken in whole or not at all (`adopt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from histo_transfer.config.errors import DiskFull

log = logging.getLogger(__name__)

MODEL_FILE, BEST_FILE, PROGRESS_FILE = "state.keras", "best_weights.npz", "progress.json"
AVERAGED_FILE = "averaged_weights_sum.npz"  # trainer.swa: the sum of the epochs averaged so far
CHECKSUMS_FILE = "checksums.json"  # sha256 of every other file of the folder


@dataclass
class Progress:
    run_id: str
    epoch: int  # epochs completed
    best_epoch: int = 0
    best_logs: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per completed epoch, lr included
    averaged_epochs: int = 0  # trainer.swa: how many epochs the stored sum holds


@dataclass
class ResumeState:
    """What an interrupted run left: its progress and the folder of its last completed epoch."""

    progress: Progress
    folder: Path

    def model(self) -> keras.Model:
        """Weights, optimizer state and schedule position as after the last completed epoch."""
        return keras.models.load_model(self.folder / MODEL_FILE)

    def best_weights(self) -> list | None:
        return _arrays(self.folder / BEST_FILE)

    def averaged_sum(self) -> list | None:
        return _arrays(self.folder / AVERAGED_FILE)


def _arrays(path: Path) -> list | None:
    if not path.exists():
        return None
    with np.load(path) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


class Checkpoints:
    """The state folders of one run: <checkpoint_dir>/<run key>/epoch_NNNN/."""

    def __init__(self, checkpoint_dir: str | Path, key: str):
        self.folder = Path(checkpoint_dir).expanduser().resolve() / key

    def latest(self) -> ResumeState | None:
        """The state of the last complete epoch whose files are intact, if any; a damaged one is
        reported (a warning naming it and what is wrong) and passed over."""
        complete = [p for p in self._epochs() if (p / PROGRESS_FILE).exists()][::-1]
        for folder in complete:
            damage = _damage(folder)
            if damage is None:
                return ResumeState(Progress(**json.loads((folder / PROGRESS_FILE).read_text())), folder)
            log.warning("checkpoint %s is damaged (%s): %s", folder, damage,
                        "falling back to the epoch before" if folder != complete[-1] else "no earlier state is left")
        return None

    def save(self, model: keras.Model, best_weights: list | None, progress: Progress,
             averaged_sum: list | None = None) -> Path:
        """Write the state after epoch `progress.epoch`; returns its folder."""
        final = self.folder / f"epoch_{progress.epoch:04d}"
        staging = self.folder / f".epoch_{progress.epoch:04d}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            model.save(staging / MODEL_FILE)  # weights and optimizer state
            if best_weights is not None:
                np.savez(staging / BEST_FILE, *best_weights)
            if averaged_sum is not None:
                np.savez(staging / AVERAGED_FILE, *averaged_sum)
            (staging / PROGRESS_FILE).write_text(json.dumps(progress.__dict__))
            sums = {path.name: _sha256(path) for path in sorted(staging.iterdir())}
            (staging / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1))
            _sync(staging)  # on disk before the rename that makes it count, even if the machine is lost
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)  # frees what it took; the earlier states stay whole
            if DiskFull.caused(exc):
                earlier = self.latest()
                kept = f"the state of epoch {earlier.progress.epoch} is kept" if earlier else "no earlier state exists"
                raise DiskFull(f"{final}: no space left on the device for the state of epoch {progress.epoch}; "
                               f"{kept}") from None
            raise
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        _sync(self.folder)
        # kept: this epoch and the one before it; states of later epochs belong to a discarded future
        below = [p for p in self._epochs() if _number(p) < progress.epoch]
        for other in self._epochs():
            if other != final and (not below or other != below[-1]):
                shutil.rmtree(other, ignore_errors=True)
        return final

    def adopt(self, state: Path) -> int | None:
        """Take in a state folder written elsewhere (a copy downloaded from the tracking server) as this
        run's; returns its epoch, or None when it holds no readable progress (nothing is taken). Only
        the files its checksums list come along: a copy overwritten in place may hold strays."""
        try:
            epoch = int(json.loads((state / PROGRESS_FILE).read_text())["epoch"])
            listed = json.loads((state / CHECKSUMS_FILE).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(listed, dict):
            return None
        final = self.folder / f"epoch_{epoch:04d}"
        if final.exists() and _damage(final) is None:  # an intact state of this epoch is here: it stands
            return epoch
        staging = self.folder / f".epoch_{epoch:04d}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in [*listed, CHECKSUMS_FILE]:
            # a name that is not a plain file name (a path) never leaves `state`; a missing file is
            # reported as damage by latest()
            if Path(name).name == name and (state / name).is_file():
                shutil.move(state / name, staging / name)
        shutil.rmtree(final, ignore_errors=True)  # a damaged one
        staging.rename(final)
        return epoch

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _epochs(self) -> list[Path]:
        """The state folders, by epoch number (not by name: epoch_10000 follows epoch_9999)."""
        return sorted(self.folder.glob("epoch_*"), key=_number)


def _number(folder: Path) -> int:
    return int(folder.name.removeprefix("epoch_"))


def _sync(folder: Path) -> None:
    """fsync every file of `folder` and the folder itself."""
    for path in [*folder.iterdir(), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def intact(folder: Path) -> bool:
    """The state folder has its checksums, and every file they list matches."""
    return (folder / CHECKSUMS_FILE).is_file() and _damage(folder) is None


def _damage(folder: Path) -> str | None:
    """What is wrong with a state folder's files (None: intact). Folders written before checksums
    existed cannot be checked and count as intact."""
    listed = folder / CHECKSUMS_FILE
    if not listed.exists():
        return None
    try:
        sums = json.loads(listed.read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS_FILE} unreadable"
    if not isinstance(sums, dict):
        return f"{CHECKSUMS_FILE} unreadable"
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if _sha256(path) != expected:
            return f"{name} does not match its checksum"
    return None


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the state after each epoch; placed after BestEpoch (and WeightAveraging) so the best weights
    (and the averaged sum) are current. `mirror(folder, epoch)`, when given, is handed each saved folder."""

    def __init__(self, checkpoints: Checkpoints, best, progress: Progress, averaging=None,
                 mirror: Callable[[Path, int], None] | None = None):
        super().__init__()
        self.checkpoints, self.best, self.progress, self.averaging = checkpoints, best, progress, averaging
        self.mirror = mirror

    def on_epoch_end(self, epoch, logs=None):
        entry = {k: float(v) for k, v in (logs or {}).items()}
        entry["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.progress.history.append(entry)
        self.progress.epoch = epoch + 1
        self.progress.best_epoch, self.progress.best_logs = self.best.best_epoch, self.best.best_logs
        averaged_sum = None
        if self.averaging is not None:
            self.progress.averaged_epochs, averaged_sum = self.averaging.count, self.averaging.total
        saved = self.checkpoints.save(self.model, self.best.weights, self.progress, averaged_sum)
        if self.mirror is not None:
            self.mirror(saved, self.progress.epoch)
