"""Shared fixtures: configs composed in-process (as lightning-hydra-template does) on temporary paths,
and one tiny model trained once through the real entrypoint for every test that inspects a run."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED = ROOT.parent / "shared"
PCAM_SAMPLE = SHARED / "data" / "pcam_sample"
MOBILENET_V1_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
PCAM_FOLDERS = SHARED / "data" / "pcam_folders"

os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# Small enough to train in seconds on 2 cores; overrides shared by every quick run.
TINY_MODEL = ["backbone=tiny_cnn", "backbone.width=8", "trainer.epochs=2", "trainer.batch_size=16",
              "trainer.early_stopping_patience=0", "trainer.bn_recalibration_batches=2"]
TINY_RUN = [*TINY_MODEL, "data.n_train=160", "data.n_test=8"]


# Files that take minutes (services, sweeps, faults), heaviest first: pytest-xdist hands its two workers
# whole files in collection order, so these start first and the light ones fill in around them.
HEAVY_FILES = ("test_team_server.py", "test_scaleout.py", "test_sweeps.py", "test_reliability.py",
               "test_cross_validation.py", "test_session.py")


def pytest_collection_modifyitems(items):
    rank = {name: number for number, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def store_overrides(tmp: Path) -> list[str]:
    """Point data cache, MLflow store and run outputs (Hydra folders, checkpoints) into `tmp`.

    The store starts as a copy of an empty one that MLflow created and migrated once per session: its
    schema migrations take seconds for each new SQLite file, and the suite makes a hundred of them
    (stores created from nothing remain, in the tests that do not come through here)."""
    database = tmp / "mlruns" / "mlflow.db"
    if not database.exists():
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), database)
    return [f"paths.cache_dir={tmp / 'cache'}", f"tracking.uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
            f"paths.output_dir={tmp}"]


@functools.cache
def _empty_store() -> Path:
    """An SQLite store as MLflow leaves it after its first start (tables made, migrations run)."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="empty-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def _checkout_state() -> set[str]:
    """What `git status --ignored` lists, less Python's and pytest's own caches."""
    listed = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT,
                            capture_output=True, text=True).stdout.splitlines()
    return {line for line in listed if "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean(tmp_path_factory):
    """The suite writes only into temporary folders: afterwards the checkout holds nothing new.

    Runs that a test does not point elsewhere put their outputs and caches under a session folder.
    """
    before = _checkout_state()
    defaults = tmp_path_factory.mktemp("defaults")
    os.environ["HISTO_TRANSFER_OUTPUT_DIR"] = str(defaults / "outputs")
    os.environ["HISTO_TRANSFER_CACHE"] = str(defaults / "cache")
    yield
    new = sorted(_checkout_state() - before)
    assert not new, f"the tests left files in the checkout: {new[:10]}"


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def run_cli(args: list[str], script: str = "train.py", fresh_process: bool = False,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """A real entrypoint (train.py or scripts/...) run as `python <script> <args>` runs it: its command
    line, Hydra sweeps and callbacks, exit status and printed lines. In this process unless
    `fresh_process`: that saves each run a new process's TensorFlow import (~14 s) and first traces.
    A fresh process where the process itself is under test: its console (C++ lines go to its file
    descriptors), signals, kill -9, its environment."""
    if fresh_process:
        # the process gets what a user's shell has: no store of this one, TensorFlow's log level its own
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TF_CPP_MIN_LOG_LEVEL")}
        return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return _run_in_this_process(args, script)


def _run_in_this_process(args: list[str], script: str) -> subprocess.CompletedProcess:
    """runpy runs the script as __main__; what a process would drop at its end is put back afterwards:
    argv, environment, working folder, tracking URI, logging handlers, warning filters, Hydra's global
    state, active MLflow runs, Keras' precision policy and graph state."""
    import io
    import logging
    import runpy
    import traceback
    import warnings

    import mlflow
    from hydra.core.global_hydra import GlobalHydra

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, environ, cwd, uri = sys.argv, dict(os.environ), os.getcwd(), mlflow.get_tracking_uri()
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    sys.argv = [str(ROOT / script), *args]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    GlobalHydra.instance().clear()
    _absl_to_the_real_stderr()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - uncaught: the process's traceback and exit status 1
        if isinstance(exc, KeyboardInterrupt):
            raise
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        GlobalHydra.instance().clear()
        while mlflow.active_run() is not None:  # a process that ends ends its runs
            mlflow.end_run()
        mlflow.set_tracking_uri(uri)
        for handler in root_logger.handlers:  # Hydra's log file of the run; streams are not the run's to close
            if handler not in handlers and isinstance(handler, logging.FileHandler):
                handler.close()
        root_logger.handlers[:], root_logger.level = handlers, level
        _absl_to_the_real_stderr()
        if "keras" in sys.modules:
            keras = sys.modules["keras"]
            keras.mixed_precision.set_global_policy("float32")
            keras.backend.clear_session()
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def _absl_to_the_real_stderr() -> None:
    """absl's log handler (TensorFlow imports it) closes its stream when Hydra reconfigures logging, unless
    that stream is sys.stderr at that moment: with sys.stderr redirected, it would close pytest's capture."""
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


def write_kaggle_layout(root: Path, labels: list[int], size=(96, 96), mode="RGB", test: int = 0) -> list[str]:
    """A small Kaggle-layout folder with random images; returns the ids."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    ids = [f"{index:040x}" for index in range(len(labels))]
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    for image_id in ids:
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(), mode).save(root / "train" / f"{image_id}.tif")
    rows = "".join(f"{i},{label}\r\n" for i, label in zip(ids, labels))
    (root / "train_labels.csv").write_bytes(f"id,label\r\n{rows}".encode())
    if test:
        (root / "test").mkdir()
        for index in range(test):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(root / "test" / f"t{index}.tif")
    return ids


@pytest.fixture
def trained_run(trained_once):
    """The shared trained run, with MLflow pointed at its store (other tests point it elsewhere)."""
    import mlflow

    mlflow.set_tracking_uri(trained_once["uri"])
    return trained_once


@pytest.fixture
def teacher_file(trained_run, tmp_path):
    """The shared trained model as a .keras file: a teacher (distill.teacher, pseudo.teacher) that any
    store can use."""
    import mlflow

    folder = mlflow.artifacts.download_artifacts(run_id=trained_run["run"].info.run_id, artifact_path="model",
                                                 dst_path=str(tmp_path / "download"))
    return Path(folder) / "model.keras"


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory):
    """One tiny model trained through `python train.py` in a process of its own, as a user runs it
    (its console is under test too); tests read its MLflow run and what it printed."""
    import mlflow

    tmp = tmp_path_factory.mktemp("trained")
    overrides = [*TINY_RUN, *store_overrides(tmp), "tracking.system_metrics_interval=1"]
    result = run_cli(overrides, fresh_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["histo-transfer"], output_format="list")
    assert len(runs) == 1
    return {"run": runs[0], "uri": uri, "tmp": tmp, "overrides": overrides, "cfg": compose_config(overrides),
            "stdout": result.stdout, "stderr": result.stderr}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_pair() -> int:
    """A free port whose next one is free too (scripts/slurm_local.sh puts slurmd on PORT+1): an ephemeral
    port's neighbour is often the local end of some connection, and slurmd then fails to bind."""
    import socket

    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


@contextlib.contextmanager
def loopback_server(command: list[str], ready, env: dict | None = None, timeout: float = 240):
    """Start a server in its own process group, wait until it is `ready` (a URL that answers, or a
    function that returns True), and on leaving stop the whole group (servers start workers) and check
    that none of its processes survives. Its output goes to a file (a pipe nobody reads would fill up
    and block it); the server object's `log` attribute names it."""
    import signal
    import tempfile
    import time
    import urllib.request

    def answers() -> bool:
        if callable(ready):
            return ready()
        try:
            urllib.request.urlopen(ready, timeout=2)
            return True
        except OSError:
            return False

    # as from an activated environment: MLflow's servers run uvicorn from PATH
    env = {**os.environ, **(env or {}), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    log = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server.log = Path(log.name)
    try:
        deadline = time.time() + timeout
        while not answers():
            assert server.poll() is None, server.log.read_text()[-3000:]
            assert time.time() < deadline, f"{command[0]} was not ready in {timeout} s"
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have failed to start
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.time() + 30
        while live_group_members(server.pid) and time.time() < deadline:
            time.sleep(0.5)
        stuck = {pid: _command_line(pid) for pid in live_group_members(server.pid)}
        if stuck:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        log.close()
        os.unlink(log.name)
    assert not stuck, f"still running 30 s after SIGTERM: {stuck}"


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(ended meanwhile)"


def live_group_members(group: int) -> list[int]:
    """Processes of a process group that still run (zombies excluded), read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members
