"""Reliability and scale-out: resume after kill -9, Ctrl-C, mirrored training, a real tracking
server, and no credentials in what runs record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from conftest import ROOT, TINY_RUN, free_port, loopback_server, run_cli, store_overrides
from mlflow.tracking import MlflowClient

EPOCH_METRICS = ["loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc", "lr"]
# epochs long enough (a few seconds) to be interrupted in the middle
SLOW_RUN = [o for o in TINY_RUN if not o.startswith(("data.n_train", "trainer.epochs"))] + [
    "data.n_train=1600", "trainer.epochs=3"]


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


@pytest.mark.slow
def test_team_tracking_server_receives_runs_and_sweeps_without_credentials(tmp_path, monkeypatch):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(ROOT / "scripts" / "tracking_server.sh"), "--port", str(port),
               "--backend", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts", str(tmp_path / "artifacts")]
    secret = "s3cr3t-do-not-log"
    with loopback_server(command, f"{base}/health"):
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # a credential in the environment of the jobs
        common = [*TINY_RUN, "trainer.epochs=1", "tracking=server", f"tracking.uri=http://alice:{secret}@127.0.0.1:{port}",
                  f"paths.cache_dir={tmp_path / 'cache'}"]
        single = run_cli(common)
        sweep = run_cli(["-m", *common, "trainer.seed=1,2"])
        assert single.returncode == 0, single.stderr[-3000:]
        assert sweep.returncode == 0, sweep.stderr[-3000:]

        # read everything back over the REST API
        experiment = rest(base, "experiments/get-by-name?experiment_name=histo-transfer")["experiment"]
        runs = rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert len(runs) == 4 and {r["info"]["status"] for r in runs} == {"FINISHED"}
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        assert len([t for t in tags if t.get("kind") == "sweep"]) == 1
        assert len([t for t in tags if t.get("mlflow.parentRunId")]) == 2
        mlflow.set_tracking_uri(base)
        for run, run_tags in zip(runs, tags):
            config = ""
            if "kind" not in run_tags:  # a training run: its artifacts went through the server's proxy
                config = mlflow.artifacts.load_text(run["info"]["artifact_uri"] + "/config/config.yaml")
                assert "model/model.keras" in artifact_paths(MlflowClient(), run["info"]["run_id"])
            assert secret not in json.dumps(run) and secret not in config
    assert (tmp_path / "artifacts").is_dir()


def rest(base: str, path: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API (GET without a body, POST with one)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())
