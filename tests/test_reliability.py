"""Reliability and scale-out: resume after kill -9, Ctrl-C, mirrored training, a real tracking
server, and no credentials in what runs record."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, TINY_RUN, live_group_members, run_cli, store_overrides

pytestmark = pytest.mark.slow
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


def test_mirrored_training_on_two_logical_cpus_matches_one_device(tmp_path):
    common = [*TINY_RUN, "trainer.epochs=2"]
    single = run_cli([*common, *store_overrides(tmp_path / "one"), "trainer.strategy=default"])
    mirrored = run_cli([*common, *store_overrides(tmp_path / "two"), "trainer.strategy=mirrored",
                        "trainer.logical_cpu_devices=2"])
    assert single.returncode == 0, single.stderr[-3000:]
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    one = only_run(f"sqlite:///{tmp_path / 'one' / 'mlruns' / 'mlflow.db'}")
    two = only_run(f"sqlite:///{tmp_path / 'two' / 'mlruns' / 'mlflow.db'}")
    assert (one.data.tags["replicas"], two.data.tags["replicas"]) == ("1", "2")
    assert two.info.status == "FINISHED"
    # same global batch and data order; per-replica BatchNorm statistics make small differences
    assert two.data.metrics["loss"] == pytest.approx(one.data.metrics["loss"], abs=0.1)
    assert two.data.metrics["best_val_auc"] == pytest.approx(one.data.metrics["best_val_auc"], abs=0.15)


def test_team_tracking_server_receives_runs_and_sweeps_without_credentials(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(ROOT / "scripts" / "tracking_server.sh"), str(port),
                               f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    secret = "s3cr3t-do-not-log"
    uri = f"http://alice:{secret}@127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "tracking server did not start"
                time.sleep(0.5)
        os.environ["AWS_SECRET_ACCESS_KEY"] = secret  # a credential in the environment of the jobs
        try:
            common = [*TINY_RUN, "trainer.epochs=1", "tracking=server", f"tracking.uri={uri}",
                      f"paths.cache_dir={tmp_path / 'cache'}"]
            single = run_cli(common)
            sweep = run_cli(["-m", *common, "trainer.seed=1,2"])
        finally:
            del os.environ["AWS_SECRET_ACCESS_KEY"]
        assert single.returncode == 0, single.stderr[-3000:]
        assert sweep.returncode == 0, sweep.stderr[-3000:]

        # read everything back over the REST API
        def rest(path, body):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}",
                                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(request, timeout=30).read())

        experiment = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=histo-transfer").read())
        runs = rest("runs/search", {"experiment_ids": [experiment["experiment"]["experiment_id"]]})["runs"]
        assert len(runs) == 4 and {r["info"]["status"] for r in runs} == {"FINISHED"}
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        [parent] = [t for t in tags if t.get("kind") == "sweep"]
        children = [t for t in tags if t.get("mlflow.parentRunId")]
        assert len(children) == 2
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        client = MlflowClient()
        for run in runs:
            recorded = json.dumps(run)
            config = ""
            if "kind" not in {t["key"] for t in run["data"].get("tags", [])}:
                config = mlflow.artifacts.load_text(run["info"]["artifact_uri"] + "/config/config.yaml")
                assert "model/model.keras" in artifact_paths(client, run["info"]["run_id"])  # proxied artifacts
            assert secret not in recorded and secret not in config
        assert (tmp_path / "artifacts").is_dir()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        deadline = time.time() + 30
        while live_group_members(server.pid) and time.time() < deadline:
            time.sleep(0.5)
        if live_group_members(server.pid):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert live_group_members(server.pid) == []
