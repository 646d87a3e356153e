"""Reliability: resume after kill -9, Ctrl-C and SIGTERM, damaged checkpoints, a full disk, mirrored
training (a team's tracking server, its restarts and what it records: test_team_server.py)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TINY_RUN,
    compose_config,
    run_cli,
    store_overrides,
    write_kaggle_layout,
)
from mlflow.tracking import MlflowClient

from histo_transfer.training.checkpoints import Checkpoints

EPOCH_METRICS = ["loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc", "lr"]
# epochs long enough (a few seconds) to be interrupted in the middle
SLOW_RUN = [o for o in TINY_RUN if not o.startswith(("data.n_train", "trainer.epochs"))] + [
    "data.n_train=1600", "trainer.epochs=3"]
# epochs of a second or two: a test that acts as soon as an epoch's state appears acts within the next
SHORT_EPOCHS = [o for o in SLOW_RUN if not o.startswith("data.n_train")] + ["data.n_train=800"]


def start_training(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epoch(checkpoints, epoch, process, timeout=300):
    deadline = time.time() + timeout
    while not list(checkpoints.glob(f"*/epoch_{epoch:04d}/progress.json")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


def only_run(uri, experiment="histo-transfer"):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def artifact_paths(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(found)


@pytest.mark.slow
def test_kill_9_in_epoch_2_then_resume_continues_the_same_run(tmp_path):
    args = [*SLOW_RUN, *store_overrides(tmp_path), f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"]
    process = start_training(args, tmp_path)
    wait_for_epoch(tmp_path / "ckpt", 1, process)
    time.sleep(0.5)  # into epoch 2
    process.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
    process.wait()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    interrupted = only_run(uri)
    assert interrupted.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(interrupted.info.run_id, "val_auc")] == [1]

    result = run_cli([*args, "trainer.resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = only_run(uri)
    assert resumed.info.run_id == interrupted.info.run_id and resumed.info.status == "FINISHED"
    for name in EPOCH_METRICS:  # every epoch once, at its own step
        assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, name)) == [1, 2, 3], name
    val_auc = {m.step: m.value for m in client.get_metric_history(resumed.info.run_id, "val_auc")}
    assert resumed.data.metrics["best_epoch"] == max(val_auc, key=val_auc.get)
    assert resumed.data.metrics["best_val_auc"] == pytest.approx(max(val_auc.values()))
    assert not list((tmp_path / "ckpt").glob("*/epoch_*"))  # finished: state removed

    # the same artifacts as an uninterrupted run of the same config
    reference = tmp_path / "reference"
    done = run_cli([*SLOW_RUN, *store_overrides(reference), f"trainer.checkpoint_dir={reference / 'ckpt'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = only_run(f"sqlite:///{reference / 'mlruns' / 'mlflow.db'}")
    assert artifact_paths(MlflowClient(f"sqlite:///{reference / 'mlruns' / 'mlflow.db'}"),
                          uninterrupted.info.run_id) == artifact_paths(client, resumed.info.run_id)
    # epoch 1 ran before the kill in both runs: identical; the seeded data order keeps later epochs alike
    first = {m.step: m.value for m in MlflowClient(f"sqlite:///{reference / 'mlruns' / 'mlflow.db'}")
             .get_metric_history(uninterrupted.info.run_id, "loss")}
    mine = {m.step: m.value for m in client.get_metric_history(resumed.info.run_id, "loss")}
    assert mine[1] == pytest.approx(first[1], rel=1e-4)
    assert mine[3] == pytest.approx(first[3], abs=0.05)


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_with_a_resume_hint(tmp_path):
    args = [*SLOW_RUN, "trainer.epochs=20", *store_overrides(tmp_path), f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"]
    process = start_training(args, tmp_path)
    wait_for_epoch(tmp_path / "ckpt", 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: the run ended KILLED") and last.endswith("trainer.resume=true")
    assert "python train.py" in last and "Traceback" not in stderr
    assert only_run(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").info.status == "KILLED"
    assert list((tmp_path / "ckpt").glob("*/epoch_*/state.keras"))  # resumable


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_resume_passes_over_a_damaged_checkpoint(tmp_path):
    """SIGTERM (what SLURM and Kubernetes send before killing a job) is handled as Ctrl-C is; the
    state a crash cut short is found by its checksum, and resuming continues from the epoch before."""
    args = [*SHORT_EPOCHS, *store_overrides(tmp_path), f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"]  # 3 epochs
    process = start_training(args, tmp_path)
    wait_for_epoch(tmp_path / "ckpt", 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("terminated: the run ended KILLED") and last.endswith("trainer.resume=true")
    assert "Traceback" not in stderr
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    killed = only_run(uri)
    assert killed.info.status == "KILLED" and killed.data.tags["error"] == "interrupted (SIGTERM)"
    states = sorted((tmp_path / "ckpt").glob("*/epoch_*"))
    assert len(states) == 2  # the last epoch's state and the one before
    damaged = states[-1] / "state.keras"
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])  # what a crash mid-write leaves

    result = run_cli([*args, "trainer.resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert f"checkpoint {states[-1]} is damaged (state.keras does not match its checksum): falling back" in said
    resumed = only_run(uri)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(resumed.info.run_id, "val_auc")]
    assert sorted(set(steps)) == [1, 2, 3]


@contextlib.contextmanager
def small_disk(folder, size: str):
    """A file system of `size` (tmpfs) mounted at `folder` for the test: a disk that can fill up."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:  # a developer's account; in CI (root) a failure
        reason = f"mounting a small tmpfs needs root: {mounted.stderr.strip()}"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk) -> Path:
    """Write a file until the disk is full; returns it (delete it to give the space back)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as stream:  # unbuffered: nothing left for close() to fail on
        with contextlib.suppress(OSError):
            while True:
                stream.write(b"\0" * (1 << 16))
    return filler


def test_a_full_disk_while_packing_the_cache_keeps_nothing_half_written(tmp_path):
    from histo_transfer.config.errors import DiskFull
    from histo_transfer.data.loading import load_training_data

    write_kaggle_layout(tmp_path / "kaggle", [0, 1] * 150)  # 300 patches, 8.3 MB packed
    with small_disk(tmp_path / "disk", "2m") as disk:
        cfg = compose_config(["data=kaggle", f"data.root={tmp_path / 'kaggle'}", *store_overrides(tmp_path),
                              f"paths.cache_dir={disk}", "data.workers=1"])
        with pytest.raises(DiskFull, match="no space left on the device for the packed cache of 300 patches"):
            load_training_data(cfg.data)
        left = [p.name for p in disk.rglob("*") if p.is_file()]
        assert all(name.endswith(".lock") for name in left), left  # no partial cache, no staging folder
        assert shutil.disk_usage(disk).used < 64 * 1024


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_fails_the_run_and_resume_continues_once_space_is_back(tmp_path):
    with small_disk(tmp_path / "disk", "32m") as disk:
        args = [*SHORT_EPOCHS, *store_overrides(tmp_path), f"trainer.checkpoint_dir={disk / 'ckpt'}"]
        process = start_training(args, tmp_path)
        wait_for_epoch(disk / "ckpt", 1, process)
        filler = fill(disk)  # in milliseconds, an epoch takes seconds: the next state meets a full disk
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        failed = re.fullmatch(r"error: (\S+/epoch_000(\d)): no space left on the device for the state of epoch \2; "
                              r"the state of epoch (\d) is kept\. Once there is space, resume with: python train\.py .*"
                              r"trainer\.resume=true", last)
        assert failed, last
        assert "Traceback" not in stderr
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
        run = only_run(uri)
        assert run.info.status == "FAILED" and "no space left" in run.data.tags["error"]
        kept = int(failed.group(3))
        states = sorted(p.name for p in (disk / "ckpt").glob("*/*"))
        assert states[-1] == f"epoch_{kept:04d}" and not any(".partial" in name for name in states)
        assert Checkpoints(disk / "ckpt", Path(failed.group(1)).parent.name).latest().progress.epoch == kept

        filler.unlink()  # space is back
        result = run_cli([*args, "trainer.resume=true"])
        assert result.returncode == 0, result.stderr[-3000:]
        resumed = only_run(uri)
        assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
        steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "val_auc")]
        assert sorted(set(steps)) == [1, 2, 3]


@pytest.mark.slow
def test_a_full_disk_while_artifacts_are_written_fails_the_run_and_resume_records_them_once_space_is_back(tmp_path):
    """The artifact store (a local one: its folder on a small disk) fills up between the last epoch and the
    model's upload: one line names the store, the run ends FAILED, resuming finishes the same run."""
    args = [*SHORT_EPOCHS, *store_overrides(tmp_path), f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"]
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with small_disk(tmp_path / "disk", "16m") as disk:
        MlflowClient(uri).create_experiment("histo-transfer", artifact_location=str(disk / "artifacts"))
        process = start_training(args, tmp_path)
        wait_for_epoch(tmp_path / "ckpt", 1, process)
        filler = fill(disk)  # epochs 2 and 3 record metrics only (the database is elsewhere); then the model
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: \S*{re.escape(str(disk / 'artifacts'))}/\S+: no space left on the device for the "
                            r"artifacts \S+\. Once there is space, resume with: python train\.py .*trainer\.resume=true",
                            last), last
        assert "Traceback" not in stderr
        failed = only_run(uri)
        assert failed.info.status == "FAILED" and "no space left" in failed.data.tags["error"]

        filler.unlink()  # space is back
        result = run_cli([*args, "trainer.resume=true"])
        assert result.returncode == 0, result.stderr[-3000:]
        resumed = only_run(uri)
        assert resumed.info.run_id == failed.info.run_id and resumed.info.status == "FINISHED"
        client = MlflowClient(uri)
        assert "model/model.keras" in artifact_paths(client, resumed.info.run_id)
        assert sorted({m.step for m in client.get_metric_history(resumed.info.run_id, "val_auc")}) == [1, 2, 3]


@pytest.mark.slow
def test_mirrored_training_on_two_logical_cpus_matches_one_device(tmp_path):
    common = [*TINY_RUN, "trainer.epochs=2"]
    single = run_cli([*common, *store_overrides(tmp_path / "one"), "trainer.strategy=default"])
    mirrored = run_cli([*common, *store_overrides(tmp_path / "two"), "trainer.strategy=mirrored",
                        "trainer.logical_cpu_devices=2"], fresh_process=True)  # CPUs split before TensorFlow starts
    assert single.returncode == 0, single.stderr[-3000:]
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    one = only_run(f"sqlite:///{tmp_path / 'one' / 'mlruns' / 'mlflow.db'}")
    two = only_run(f"sqlite:///{tmp_path / 'two' / 'mlruns' / 'mlflow.db'}")
    assert (one.data.tags["replicas"], two.data.tags["replicas"]) == ("1", "2")
    assert two.info.status == "FINISHED"
    # same global batch and data order; per-replica BatchNorm statistics make small differences
    assert two.data.metrics["loss"] == pytest.approx(one.data.metrics["loss"], abs=0.1)
    assert two.data.metrics["best_val_auc"] == pytest.approx(one.data.metrics["best_val_auc"], abs=0.15)
