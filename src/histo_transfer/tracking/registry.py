"""Model references (run id, registered model, .keras file) and the MLflow model registry."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from histo_transfer.config.errors import ConfigError, UserError
from histo_transfer.tracking.parent_runs import child_runs
from histo_transfer.tracking.schema import (
    FOLD_TAG,
    KIND_TAG,
    MODEL_ARTIFACT,
    OBJECTIVE_METRIC_PARAM,
    OBJECTIVE_MODE_PARAM,
    SOURCE_RUN_TAG,
    RunKind,
)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class LoadedModel:
    model: object  # keras.Model
    ref: str
    source_run_id: str | None  # the training run, when known


def member_refs(ref, top_k: int = 5) -> list[str]:
    """The single-model references an ensemble reference stands for: a list of references; a CV parent
    run (its folds' models); a sweep parent run (its best `top_k` jobs by their objective); otherwise
    `ref` itself."""
    from omegaconf import ListConfig

    if isinstance(ref, (list, tuple, ListConfig)):
        return [one for item in ref for one in member_refs(item, top_k)]
    ref = str(ref)
    if not RUN_ID.match(ref):
        return [ref]
    client = mlflow.tracking.MlflowClient()
    try:
        run = client.get_run(ref)
    except MlflowException as exc:
        raise ConfigError("model", f"no run {ref} in {mlflow.get_tracking_uri()}") from exc
    kind = run.data.tags.get(KIND_TAG)
    if kind not in (RunKind.CV, RunKind.SWEEP):
        return [ref]
    children = [child for child in child_runs(client, run)
                if child.info.status == "FINISHED" and child.data.tags.get(KIND_TAG) in (None, RunKind.CV_FOLD)]
    if kind == RunKind.CV:
        children.sort(key=lambda child: int(child.data.tags.get(FOLD_TAG, 0)))
    else:  # the objective each job optimised; its direction is a param of the jobs
        metric = children[0].data.params.get(OBJECTIVE_METRIC_PARAM, "val_auc") if children else "val_auc"
        lowest_first = children[0].data.params.get(OBJECTIVE_MODE_PARAM) == "min" if children else False
        children = [c for c in children if f"best_{metric}" in c.data.metrics]
        children.sort(key=lambda c: c.data.metrics[f"best_{metric}"], reverse=not lowest_first)
        children = children[:top_k]
    if not children:
        raise ConfigError("model", f"{kind} run {ref} has no finished training run with a model")
    return [child.info.run_id for child in children]


def pinned_ref(ref: str) -> str:
    """`ref` as it stands now, for a key that must change when what it names changes: an alias becomes
    `models:/NAME/VERSION`, a .keras file its path with the sha256 of its bytes; run ids stay."""
    ref = str(ref)
    if ref.startswith("models:/") and "@" in ref:
        name, alias = ref.removeprefix("models:/").split("@", 1)
        try:
            version = mlflow.tracking.MlflowClient().get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            raise ConfigError("model", f"{ref}: {exc.message.splitlines()[0]}") from exc
        return f"models:/{name}/{version}"
    path = Path(ref).expanduser()
    if not ref.startswith("models:/") and not RUN_ID.match(ref) and path.is_file():
        return f"{path.resolve()} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return ref


def load_models(ref, top_k: int = 5) -> list[LoadedModel]:
    """Every member of `ref` (see member_refs), loaded."""
    return [load_model(one) for one in member_refs(ref, top_k)]


def load_model(ref: str) -> LoadedModel:
    """Load `ref`: an MLflow run id, `models:/NAME@alias`, `models:/NAME/VERSION`, or a `.keras` path.

    Keras safe mode is on: a file that carries arbitrary Python code (a Lambda layer) is refused.
    """
    ref = str(ref)
    if ref.startswith("models:/"):
        run_id = _registered_source_run(ref)
        try:
            folder = Path(mlflow.artifacts.download_artifacts(ref))
        except MlflowException as exc:
            raise ConfigError("model", f"{ref}: {exc.message.splitlines()[0]}") from exc
        [path] = sorted(folder.rglob("*.keras"))[:1] or [None]
        if path is None:
            raise ConfigError("model", f"{ref} holds no .keras file")
        return LoadedModel(_load_keras(path, ref), ref, run_id)
    if RUN_ID.match(ref):
        try:
            path = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=MODEL_ARTIFACT)
        except (MlflowException, OSError) as exc:
            raise ConfigError("model", f"run {ref} has no {MODEL_ARTIFACT} in {mlflow.get_tracking_uri()}") from exc
        return LoadedModel(_load_keras(Path(path), ref), ref, ref)
    path = Path(ref).expanduser()
    if path.suffix == ".keras" and path.is_file():
        return LoadedModel(_load_keras(path, ref), ref, None)
    raise ConfigError("model", f"{ref!r} is neither an MLflow run id, a models:/NAME@alias or models:/NAME/VERSION "
                               "reference, nor an existing .keras file")


def _load_keras(path: Path, ref: str):
    import keras

    try:
        # compile=False: scoring needs no loss, and a model saved with a custom one still loads
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise UserError(f"model {ref}: refused, the file carries arbitrary Python code (a Lambda layer) that "
                            "Keras safe mode will not run; load only models you trust, rebuilt without Lambda layers"
                            ) from exc
        raise UserError(f"model {ref}: not a loadable Keras model ({str(exc).splitlines()[0][:300]})") from exc


def _registered_source_run(ref: str) -> str | None:
    client = mlflow.tracking.MlflowClient()
    spec = ref.removeprefix("models:/")
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        name, _, version = spec.rpartition("/")
        if name and version.isdigit():
            return client.get_model_version(name, version).run_id
    except MlflowException as exc:
        raise ConfigError("model", f"{ref}: {exc.message.splitlines()[0]}") from exc
    return None


def register(run_id: str, name: str, alias: str | None = None) -> str:
    """Register the MLflow-logged model of training run `run_id` as a new version of `name`;
    point `alias` at it. Returns the version."""
    client = mlflow.tracking.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError("run", f"no run {run_id} in {mlflow.get_tracking_uri()}") from exc
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'", output_format="list")
    if not logged:
        raise ConfigError("run", f"run {run_id} logged no model (only training runs do)")
    version = mlflow.register_model(logged[0].model_uri, name, tags={SOURCE_RUN_TAG: run_id}).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)
