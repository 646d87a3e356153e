"""Past one machine, for real: a PostgreSQL tracking server, an outage of it, SLURM, Ray and two
tf.distribute workers, each started on 127.0.0.1 by these tests (`pytest -m scaleout`).

.ci/run installs what they need (Debian's slurm-wlm and munge, the `ray` and `server` extras); on a
machine without them the tests say so and skip, and in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, compose_config, free_port, free_port_pair, loopback_server, run_cli
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]
EPOCH_METRICS = ["loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc", "lr"]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def require(condition: bool, reason: str) -> None:
    """Skip on a developer's machine that lacks a service; in CI a missing service is a failure."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (.ci/run installs it)")
        pytest.skip(reason)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass
class TrackingServer:
    uri: str
    pg_port: int | None = None

    def runs(self, experiment: str) -> list:
        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []


@pytest.fixture(scope="module")
def team_server():
    """scripts/tracking_server.sh --backend postgres: a throwaway PostgreSQL cluster behind MLflow."""
    require(PG_BIN.joinpath("initdb").exists(), f"PostgreSQL 15 is not installed ({PG_BIN})")
    require(has_module("psycopg"), "psycopg is not installed (pip install -e '.[server]')")
    # the cluster runs as `postgres` when we are root: its folder must be reachable by that user
    folder = Path(tempfile.mkdtemp(prefix="histo-pg-"))
    folder.chmod(0o755)
    port, pg_port = free_port(), free_port()
    command = [str(ROOT / "scripts" / "tracking_server.sh"), "--port", str(port), "--backend", "postgres",
               "--pgdata", str(folder / "pgdata"), "--pg-port", str(pg_port), "--artifacts", str(folder / "artifacts")]
    try:
        with loopback_server(command, f"http://127.0.0.1:{port}/health"):
            yield TrackingServer(f"http://127.0.0.1:{port}", pg_port)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def server_args(server: TrackingServer, experiment: str, tmp_path: Path) -> list[str]:
    return ["tracking=server", f"tracking.uri={server.uri}", f"tracking.experiment={experiment}",
            f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}"]


def assert_sweep_finished(server: TrackingServer, experiment: str, jobs: int, epochs: int) -> list:
    """One FINISHED parent, `jobs` FINISHED children under it with every epoch's metrics; returns them."""
    runs = server.runs(experiment)
    [parent] = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(runs) == jobs + 1
    assert len(children) == jobs and {r.info.status for r in children} == {"FINISHED"}
    client = MlflowClient(server.uri)
    for child in children:
        for metric in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == list(range(1, epochs + 1))
    return children


# --- an outage of the tracking server ---------------------------------------------------------------------

# epochs of a few seconds each, so that the server can go away between two of them
OUTAGE_RUN = [o for o in TINY_RUN if not o.startswith(("data.n_train", "trainer.epochs"))] + [
    "data.n_train=1600", "trainer.epochs=3", "tracking.system_metrics=false"]


class RestartableServer:
    """A SQLite-backed tracking server that a test stops and starts again on the same port and store."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.command = [str(ROOT / "scripts" / "tracking_server.sh"), "--port", str(self.port),
                        "--backend", f"sqlite:///{folder / 'server.db'}", "--artifacts", str(folder / "artifacts")]
        self._running = None

    def start(self):
        self._running = loopback_server(self.command, f"{self.uri}/health")
        self._running.__enter__()

    def stop(self):
        self._running.__exit__(None, None, None)
        self._running = None


@pytest.fixture
def restartable_server(tmp_path):
    server = RestartableServer(tmp_path / "server")
    server.start()
    yield server
    if server._running:
        server.stop()


def start_training(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_epoch(checkpoints: Path, epoch: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(checkpoints.glob(f"*/epoch_{epoch:04d}/progress.json")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, f"no epoch {epoch} in {timeout} s"
        time.sleep(0.1)


def assert_complete_run(uri: str, epochs: int = 3):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("histo-transfer").experiment_id])
    assert run.info.status == "FINISHED"
    for metric in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == list(range(1, epochs + 1))
    assert "eval/auc" in run.data.metrics and "best_val_auc" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.keras"}
    assert client.search_logged_models([run.info.experiment_id])[0].source_run_id == run.info.run_id
    return run


def stop_the_server_after_epoch_1(server: RestartableServer, tmp_path: Path, limit_s: float) -> subprocess.Popen:
    """Training (3 epochs) against `server`, which goes away once epoch 1 is done."""
    process = start_training([*OUTAGE_RUN, "tracking=server", f"tracking.uri={server.uri}",
                              f"tracking.outage_limit_s={limit_s}", f"paths.cache_dir={tmp_path / 'cache'}",
                              f"paths.output_dir={tmp_path}"])
    wait_for_epoch(tmp_path / "checkpoints", 1, process)
    server.stop()
    return process


def test_a_20_s_outage_of_the_tracking_server_loses_nothing(restartable_server, tmp_path):
    process = stop_the_server_after_epoch_1(restartable_server, tmp_path, limit_s=300)
    time.sleep(20)  # epochs 2 and 3 end meanwhile (or training waits for the server at its end)
    restartable_server.start()
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert "does not answer: training goes on" in output and "is back after" in output  # met, not missed
    assert_complete_run(restartable_server.uri)
    assert not (tmp_path / "unsent").exists()  # everything sent, nothing left behind


def test_a_server_away_past_the_limit_keeps_the_run_for_sync_run(restartable_server, tmp_path):
    process = stop_the_server_after_epoch_1(restartable_server, tmp_path, limit_s=3)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]  # training finished: the server is not its business
    hint = re.search(r"Upload them with: python scripts/sync_run\.py (\S+)", output)
    assert hint, output[-3000:]
    kept = Path(hint.group(1))
    queue = json.loads((kept / "outbox.json").read_text())
    assert queue["status"] == "FINISHED" and any(item["kind"] == "logged_model" for item in queue["pending"])
    assert list(kept.glob("files/*/model.keras"))  # the model is on disk, not lost

    # still away: sync_run says so, keeps everything, exits non-zero
    early = run_cli([str(kept)], script="scripts/sync_run.py")
    assert early.returncode == 1 and "does not answer" in early.stderr and (kept / "outbox.json").exists()

    restartable_server.start()
    synced = run_cli([str(kept)], script="scripts/sync_run.py")
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert_complete_run(restartable_server.uri)
    assert not kept.exists()


def test_training_refuses_to_start_when_the_tracking_server_is_away(tmp_path):
    result = run_cli([*TINY_RUN, "tracking=server", f"tracking.uri=http://127.0.0.1:{free_port()}",
                      f"paths.output_dir={tmp_path}"])
    assert result.returncode == 2
    assert "tracking.uri: the tracking server" in result.stderr and "does not answer" in result.stderr
    assert "Traceback" not in result.stderr


# --- SLURM, Ray ------------------------------------------------------------------------------------------


@pytest.fixture
def slurm_cluster(tmp_path):
    """scripts/slurm_local.sh: munge, slurmctld and slurmd of Debian's packages, on this machine."""
    require(shutil.which("slurmd") or Path("/usr/sbin/slurmd").exists(), "SLURM is not installed (apt-get install slurm-wlm munge)")
    folder = tmp_path / "slurm"
    conf = folder / "slurm.conf"
    env = {"SLURM_CONF": str(conf), "PATH": f"{os.environ['PATH']}:/usr/sbin"}

    def node_idle() -> bool:
        if not conf.exists():
            return False
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env={**os.environ, **env}, capture_output=True, text=True)
        return state.stdout.strip() == "idle"

    with loopback_server([str(ROOT / "scripts" / "slurm_local.sh"), str(folder), str(free_port_pair())], node_idle,
                         timeout=120):
        yield env
    assert processes_running_from(folder) == []  # job steps leave the process group: the script ends them too


def processes_running_from(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (SLURM's job scripts and steps do)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in command:
            found.append(command)
    return found


def test_a_sweep_on_a_one_node_slurm_cluster(slurm_cluster, team_server, tmp_path, monkeypatch):
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    result = run_cli(["-m", *TINY_RUN, "trainer.epochs=1", "hydra/launcher=slurm", "trainer.seed=1,2",
                      "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
                      *server_args(team_server, "slurm-sweep", tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_sweep_finished(team_server, "slurm-sweep", jobs=2, epochs=1)
    [parent] = [r for r in team_server.runs("slurm-sweep") if r.data.tags.get("kind") == "sweep"]
    logs = sorted(Path(parent.data.tags["sweep_dir"]).glob(".submitit/*/*_log.out"))
    assert len(logs) == 2  # each SLURM job's own log, in Hydra's sweep folder
    assert all("finished: best val_auc" in log.read_text() + log.with_suffix(".err").read_text() for log in logs)


def test_a_slurm_job_cancelled_with_scancel_resumes_into_the_same_run_on_another_node(slurm_cluster, team_server,
                                                                                       tmp_path, monkeypatch):
    """scancel sends SIGTERM (SIGKILL after KillWait): the job checkpoints, ends its run KILLED (SIGTERM)
    and prints the resume command. Run where the job's checkpoint folder is not (another node, no shared
    file system), that command continues the same run from the state the job uploaded to the team
    server, which deletes it once the run is finished."""
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    node = tmp_path / "node1"
    args = [*OUTAGE_RUN, *server_args(team_server, "scancel", node)]  # 3 epochs, checkpoints under node1/
    log = tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--chdir={ROOT}", "--cpus-per-task=1",
                                "--mem=2G", "--wrap", "exec " + shlex.join([sys.executable, "train.py", *args])],
                               capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    client = MlflowClient(team_server.uri)
    deadline = time.time() + 300
    while not ((runs := team_server.runs("scancel"))
               and client.list_artifacts(runs[0].info.run_id, "checkpoints/slot_1")):  # epoch 1 is on the server
        assert time.time() < deadline, f"no epoch 1 in 300 s: {log.read_text()[-3000:] if log.exists() else ''}"
        time.sleep(0.2)
    subprocess.run(["scancel", job], check=True)
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline + 120, "the cancelled job did not leave the queue"
        time.sleep(0.5)
    said = log.read_text()
    [killed] = team_server.runs("scancel")
    assert killed.info.status == "KILLED" and killed.data.tags["error"] == "interrupted (SIGTERM)", said[-3000:]
    assert said.strip().splitlines()[-1].endswith("trainer.resume=true") and "Traceback" not in said
    assert list((node / "checkpoints").glob("*/epoch_*/state.keras"))

    other = tmp_path / "node2"  # the same data (paths.cache_dir), none of node1's folders
    resumed = run_cli([*OUTAGE_RUN, *server_args(team_server, "scancel", other), f"paths.cache_dir={node / 'cache'}",
                       "trainer.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert f"of run {killed.info.run_id} come from the tracking server" in said
    assert re.search(f"resuming run {killed.info.run_id} after epoch [12] of 3", said)  # not from scratch
    [run] = team_server.runs("scancel")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert sorted(set(history)) == [1, 2, 3] and history.count(1) == 1  # epoch 1 was not trained again
    assert client.list_artifacts(run.info.run_id, "checkpoints") == []
    assert not list((other / "checkpoints").glob("*/epoch_*"))


def test_slides_spread_over_a_one_node_slurm_cluster_one_job_each(slurm_cluster, team_server, tmp_path, monkeypatch):
    from histo_transfer.data.slides.synthetic import write_synthetic_slide
    from histo_transfer.models.classifier import build_classifier

    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config(TINY_RUN)
    model, _ = build_classifier(cfg.backbone, cfg.head)  # scoring needs a model, not a good one
    model.save(tmp_path / "tiny.keras")
    slides = [write_synthetic_slide(tmp_path / f"{name}.tif", (512, 384), mpp=0.972, tissue=(64, 64, 384, 256),
                                    tumour=(192, 128, 128, 96), seed=seed).path for seed, name in enumerate("ab")]
    result = run_cli(["-m", f"model={tmp_path / 'tiny.keras'}", f"slide={slides[0]},{slides[1]}",
                      f"output={tmp_path / 'maps'}", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
                      "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
                      *server_args(team_server, "slurm-slides", tmp_path)], script="predict_slide.py")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = team_server.runs("slurm-slides")
    [parent] = [r for r in runs if r.data.tags.get("kind") == "slide-folder"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.metrics["slides_scored"] == 2
    assert sorted(r.data.tags["slide_path"] for r in children) == sorted(map(str, slides))
    assert all(r.info.status == "FINISHED" and "slide/tiles_scored" in r.data.metrics for r in children)
    assert {path.name for path in (tmp_path / "maps").iterdir()} == {"a", "b"}


@pytest.fixture
def ray_head():
    """A local Ray head on 127.0.0.1 (`ray start --head --block`), stopped with its process group."""
    require(has_module("ray") and has_module("hydra_plugins.hydra_ray_launcher"),
            "ray and hydra-ray-launcher are not installed (pip install -e '.[ray]')")
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()

    def up() -> bool:
        return subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], capture_output=True).returncode == 0

    command = [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]
    with loopback_server(command, up, timeout=180):
        try:
            yield f"127.0.0.1:{port}"
        finally:  # Ray's daemons first (`ray start --block` then ends too): SIGTERM alone takes ~30 s
            subprocess.run([ray, "stop", "--force"], capture_output=True)


def test_a_sweep_on_a_local_ray_cluster(ray_head, team_server, tmp_path):
    result = run_cli(["-m", *TINY_RUN, "trainer.epochs=1", "hydra/launcher=ray", "trainer.seed=1,2",
                      f"hydra.launcher.ray.init.address={ray_head}", *server_args(team_server, "ray-sweep", tmp_path)],
                     fresh_process=True)  # ray.init connects this process to the cluster as its driver, for good
    assert result.returncode == 0, result.stderr[-3000:]
    assert_sweep_finished(team_server, "ray-sweep", jobs=2, epochs=1)


# --- two tf.distribute workers ----------------------------------------------------------------------------


def test_two_multi_worker_processes_train_one_model_and_the_chief_alone_records_it(team_server, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = [*TINY_RUN, "trainer.strategy=multi_worker", *server_args(team_server, "multi-worker", tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    workers = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, text=True,
                                env={**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    [run] = team_server.runs("multi-worker")  # exactly one run: the chief's
    assert run.info.status == "FINISHED" and run.data.tags["replicas"] == "2"
    assert [m.step for m in MlflowClient(team_server.uri).get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
    models = MlflowClient(team_server.uri).search_logged_models([run.info.experiment_id])
    assert len(models) == 1  # one saved model
    digests = [re.findall(r"final weights: sha256 (\w+)", output) for output in outputs]
    assert digests[0] == digests[1] == [run.data.tags["weights_sha256"]]  # same final weights on both workers
    assert "training with the chief, which alone records the run" in outputs[1]


# --- GPU readiness -----------------------------------------------------------------------------------------
