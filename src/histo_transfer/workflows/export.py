"""Any model reference (a CV parent, a sweep parent, a list) exported as ONE self-contained model, with
its test-time augmentation baked in, in a tracked run of its own: what scripts/register.py registers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from histo_transfer.models.ensemble import export_ensemble
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.registry import load_models, register
from histo_transfer.tracking.schema import KIND_TAG, MODEL_REF_TAG, RunKind


def register_from_config(cfg: DictConfig) -> str:
    """A training run's model (`run=`), or any model reference (`model=`) exported first; returns the
    registered version."""
    experiment_id = tracking.setup(cfg.tracking)
    run_id = str(cfg.run) if cfg.run is not None else export(cfg, experiment_id)
    version = register(run_id, str(cfg.name), cfg.alias)
    print(f"registered run {run_id} as models:/{cfg.name}/{version}"
          + (f" (alias {cfg.alias}: models:/{cfg.name}@{cfg.alias})" if cfg.alias else ""))
    return version


def export(cfg: DictConfig, experiment_id: str) -> str:
    """One run (tag kind=export) holding `cfg.model`'s members and TTA as one model: model/model.keras
    and the MLflow-logged model that registration and `mlflow models serve` use. Returns its id."""
    members = load_models(cfg.model, cfg.ensemble.top_k)
    model = export_ensemble([m.model for m in members], cfg.export.tta, name=str(cfg.name))
    tags = {KIND_TAG: RunKind.EXPORT.value, MODEL_REF_TAG: str(cfg.model), "tta": cfg.export.tta,
            "n_members": str(len(members)), "members": ",".join(m.source_run_id or m.ref for m in members)}
    with tracking.tracked_run(experiment_id, f"export {cfg.name} tta={cfg.export.tta}", tags) as run, \
            tempfile.TemporaryDirectory() as tmp:
        example = np.random.default_rng(0).integers(0, 256, (2, *model.input_shape[1:]), dtype=np.uint8)
        tracking.log_keras_model(model, example, Path(tmp))
    return run.info.run_id
