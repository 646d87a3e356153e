"""What a training run sends to its tracking store, kept in a local folder until the store has it.

A tracking server that goes away for a while (a restart, a network cut) must neither stop nor stall
training: metrics, tags, artifacts and the logged model go through an Outbox. It sends at once while
the store answers; while the server's /health does not, it queues on disk (`outbox.json` and the
files beside it) and sends the queue, in order, when the server is back. At the end of the run it
waits up to `tracking.outage_limit_s` for the server; past that, the folder stays, the run stays
RUNNING on the server, and `python scripts/sync_run.py FOLDER` sends the rest and ends it later.

Only what happens after the run started goes through here: a server that is away at the start is a
clear error (tracking.runs.setup), since nothing has been trained yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from histo_transfer.config.errors import ConfigError, DiskFull
from histo_transfer.tracking.access import check_server
from histo_transfer.tracking.redaction import redact_uri
from histo_transfer.tracking.schema import LOGGED_MODEL_NAME, MODEL_ARTIFACT, MODEL_SUMMARY_ARTIFACT

log = logging.getLogger(__name__)

QUEUE = "outbox.json"
RETRY_S = 5.0  # while the server is away, how often a new record tries to send the queue


class Unsent(Exception):
    """A run finished training while its tracking server stayed away: its records wait in `folder`."""

    def __init__(self, folder: Path):
        super().__init__(f"tracking server unreachable: the rest of the run is kept in {folder}")
        self.folder = folder

    def upload_hint(self) -> str:
        return f"python scripts/sync_run.py {self.folder}"


def store_answers(uri: str, timeout: float = 3.0) -> bool:
    """A tracking server answers its /health (over a connection this machine trusts); any other store
    (a SQLite file, a database) counts as there."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        check_server(uri, timeout)
    except ConfigError:
        return False
    return True


@contextlib.contextmanager
def few_retries(retries: int = 1, timeout_s: int | None = None):
    """MLflow's HTTP calls with `retries` quick retries instead of its default 7 with exponential backoff
    (minutes): a call made while the server is away fails in seconds, and its record waits here."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    if timeout_s is not None:
        settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Outbox:
    """Sends one run's records to `uri` in order, queueing them in `folder` while the store is away."""

    def __init__(self, folder: Path, run_id: str, uri: str):
        self.folder, self.run_id, self.uri = Path(folder), run_id, uri
        self.pending: list[dict] = []
        self.status: str | None = None  # the run's final status, once it ended
        self._live: dict[int, object] = {}  # item number -> the Keras model in memory (else loaded from its file)
        self._count = 0
        self._outage_since: float | None = None  # monotonic time the server stopped answering
        self._retry_at = 0.0  # while it does not answer, new records only queue until then

    @classmethod
    def load(cls, folder: Path) -> Outbox:
        """The outbox a run left behind (scripts/sync_run.py)."""
        state = json.loads((Path(folder) / QUEUE).read_text())
        outbox = cls(folder, state["run_id"], state["uri"])
        outbox.pending, outbox.status, outbox._count = state["pending"], state["status"], state["count"]
        return outbox

    # what a run records
    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._put({"kind": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step or 0,
                   "timestamp": int(time.time() * 1000)})

    def tags(self, tags: dict[str, str]) -> None:
        self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def staging(self, name: str) -> Path:
        """A fresh folder for files that `artifacts` will send (deleted once sent)."""
        while True:  # past numbers an interrupted attempt of the run may have used
            self._count += 1
            path = self.folder / "files" / f"{self._count:04d}-{name}"
            if not path.exists():
                path.mkdir(parents=True)
                return path

    def artifacts(self, path: Path, artifact_path: str | None = None, *, supersedes: bool = False,
                  optional: bool = False) -> None:
        """Send the file or folder `path` (inside `staging`) under `artifact_path`. `supersedes`: an
        upload to the same `artifact_path` still queued is dropped (only the newest matters there).
        `optional`: a server that refuses it (too big for its proxy, say) gets a warning, not the run's end."""
        if supersedes:
            self._unqueue(lambda queued: queued == artifact_path)
        self._put({"kind": "artifacts", "path": str(Path(path).relative_to(self.folder)), "artifact_path": artifact_path,
                   "optional": optional})

    def delete_artifacts(self, artifact_path: str) -> None:
        """Delete the run's artifacts under `artifact_path` (uploads of them still queued are dropped). A
        server that refuses (a user without MANAGE on the experiment) gets a warning, not the run's end."""
        self._unqueue(lambda queued: queued is not None and (queued + "/").startswith(artifact_path.rstrip("/") + "/"))
        self._put({"kind": "delete_artifacts", "artifact_path": artifact_path})

    def _unqueue(self, artifact_path_matches) -> None:
        dropped = [i for i in self.pending if i["kind"] == "artifacts" and artifact_path_matches(i["artifact_path"])]
        for item in dropped:
            self.pending.remove(item)
        if dropped:
            self._save()  # the queue on disk stops naming the files before they go
        for item in dropped:
            self._drop_files(item)

    def text(self, text: str, artifact_file: str) -> None:
        folder = self.staging(Path(artifact_file).name)
        (folder / Path(artifact_file).name).write_text(text)
        self.artifacts(folder / Path(artifact_file).name, Path(artifact_file).parent.as_posix() or None)

    def keras_model(self, model, example) -> None:
        """`model` as model/model.keras and its summary, and as an MLflow-logged (servable) model."""
        import keras
        import tensorflow as tf
        from mlflow.models import infer_signature

        lines: list[str] = []
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=False)
        self.text("\n".join(lines), MODEL_SUMMARY_ARTIFACT)
        path = self.staging("model") / Path(MODEL_ARTIFACT).name
        model.save(path)
        self._live[self._count] = model
        example = example.astype("float32")
        signature = infer_signature(example, model.predict(example, verbose=0))
        relative = str(path.relative_to(self.folder))
        # both at once: the file stays until the second is sent. Explicit requirements: inferring them
        # would re-import TensorFlow in a subprocess.
        self._put({"kind": "artifacts", "path": relative, "artifact_path": Path(MODEL_ARTIFACT).parent.as_posix()},
                  {"kind": "logged_model", "path": relative, "signature": signature.to_dict(),
                   "requirements": [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]})

    # sending
    def flush(self) -> bool:
        """Send what is queued, in order; True when nothing is left. Stops at the first failure while the
        server does not answer (the rest waits); a failure while it answers is a real error and raises."""
        if self.pending and not store_answers(self.uri):
            return self._away()
        sent = 0
        while self.pending:
            item = self.pending[0]
            try:
                with few_retries():
                    self._send(item)
            except Exception:
                if store_answers(self.uri):
                    raise
                return self._away()
            self.pending.pop(0)
            if "path" in item:  # the queue on disk stops naming the files before they go
                self._save()
                self._drop_files(item)
            sent += 1
        if self._outage_since is not None:
            log.warning("tracking server %s is back after %.0f s: %d kept record(s) sent", redact_uri(self.uri),
                        time.monotonic() - self._outage_since, sent)
            self._outage_since = None
        self._save()
        return True

    def _away(self) -> bool:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("tracking server %s does not answer: training goes on, records are kept in %s until it "
                        "is back", redact_uri(self.uri), self.folder)
        self._save()
        return False

    def close(self, wait_s: float, poll_s: float = 1.0) -> bool:
        """Send everything, waiting up to `wait_s` for a server that is away. True: all sent (the folder
        is removed); False: the folder holds the rest for scripts/sync_run.py."""
        deadline = time.monotonic() + wait_s
        announced = False
        while not self.flush():
            if time.monotonic() >= deadline:
                return False
            if not announced:
                log.warning("training done; waiting up to %.0f s (tracking.outage_limit_s) for the tracking server "
                            "%s to send %d record(s)", wait_s, redact_uri(self.uri), len(self.pending))
                announced = True
            time.sleep(poll_s)
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # unsent/ itself, when no other run left anything there
            self.folder.parent.rmdir()
        return True

    def discard_if_empty(self) -> None:
        """A run that ended with nothing queued (interrupted, failed): its staging files go."""
        if not self.pending and self.status is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.folder.parent.rmdir()

    def keep(self, status: str) -> None:
        """The run ended locally with `status`, which sync_run.py sets on the server after the rest."""
        self.status = status
        self._save()

    def _put(self, *items: dict) -> None:
        self.pending.extend(items)
        if time.monotonic() < self._retry_at:
            self._save()
        elif not self.flush():
            self._retry_at = time.monotonic() + RETRY_S

    def _send(self, item: dict) -> None:
        client = MlflowClient(self.uri)
        kind = item["kind"]
        if kind == "metrics":
            client.log_batch(self.run_id, metrics=[Metric(k, v, item["timestamp"], item["step"])
                                                   for k, v in item["metrics"].items()], synchronous=True)
        elif kind == "tags":
            for key, value in item["tags"].items():
                client.set_tag(self.run_id, key, value)
        elif kind == "artifacts":
            path = self.folder / item["path"]
            try:
                if path.is_dir():
                    client.log_artifacts(self.run_id, str(path), item["artifact_path"])
                else:
                    client.log_artifact(self.run_id, str(path), item["artifact_path"])
            except Exception as exc:
                # a local artifact store's disk is full (a server answers with an HTTP error, which is an
                # OSError too, without errno)
                if isinstance(exc, OSError) and DiskFull.caused(exc):
                    where = redact_uri(client.get_run(self.run_id).info.artifact_uri)
                    raise DiskFull(f"{where}: no space left on the device for the artifacts "
                                   f"{item['artifact_path'] or path.name}") from None
                if not (item.get("optional") and store_answers(self.uri)):
                    raise
                log.warning("the tracking server refused the artifacts %s of run %s (%s): training goes on without "
                            "them", item["artifact_path"], self.run_id, _first_line(exc))
        elif kind == "delete_artifacts":
            self._delete(client, item["artifact_path"])
        elif kind == "logged_model":
            self._log_model(item)
        else:
            raise ValueError(f"{self.folder / QUEUE}: unknown record kind {kind!r}")

    def _delete(self, client: MlflowClient, artifact_path: str) -> None:
        if not client.list_artifacts(self.run_id, artifact_path):
            return
        try:
            get_artifact_repository(client.get_run(self.run_id).info.artifact_uri).delete_artifacts(artifact_path)
        except Exception as exc:
            if not store_answers(self.uri):
                raise  # the record waits for the server
            refused = "403" in str(exc) or "PERMISSION_DENIED" in str(exc)
            log.warning("the artifacts %s/ of run %s stay on the server: %s", artifact_path, self.run_id,
                        "deleting artifacts needs MANAGE on its experiment" if refused else _first_line(exc))

    def _log_model(self, item: dict) -> None:
        from mlflow.models import ModelSignature

        model = self._live.get(_staging_number(item))
        if model is None:  # a later process (sync_run.py): the model from its saved file
            import keras

            model = keras.saving.load_model(self.folder / item["path"])
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"the logged model of run {self.run_id} is sent inside that run")
        mlflow.keras.log_model(model, name=LOGGED_MODEL_NAME, signature=ModelSignature.from_dict(item["signature"]),
                               pip_requirements=item["requirements"])

    def _drop_files(self, item: dict) -> None:
        """Delete a sent item's staging folder once no queued item needs it."""
        if "path" in item and not any(_staging_number(i) == _staging_number(item) for i in self.pending):
            shutil.rmtree(self.folder.joinpath(*Path(item["path"]).parts[:2]), ignore_errors=True)

    def _save(self) -> None:
        """outbox.json, replaced atomically: a crash never leaves half a queue."""
        if not self.pending and self.status is None and not self.folder.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"run_id": self.run_id, "uri": redact_uri(self.uri), "status": self.status, "count": self._count,
                 "pending": self.pending}
        partial = self.folder / f".{QUEUE}.tmp-{os.getpid()}"
        partial.write_text(json.dumps(state, indent=1))
        os.replace(partial, self.folder / QUEUE)


def _first_line(exc: Exception) -> str:
    return redact_uri(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def _staging_number(item: dict) -> int | None:
    """The staging folder (files/NNNN-name/...) an item's file lies in."""
    return int(Path(item["path"]).parts[1].split("-")[0]) if "path" in item else None
