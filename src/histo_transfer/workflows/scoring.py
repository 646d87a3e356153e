"""Patches scored with any model reference, each a tracked run: a checked submission (predict.py), an
evaluation report (evaluate.py), Grad-CAM pictures (scripts/explain.py)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.cache import Rows
from histo_transfer.data.loading import load_training_data
from histo_transfer.data.sources import data_source
from histo_transfer.evaluation.gradcam import explainable, grad_cam, overlay
from histo_transfer.evaluation.inference import ensemble_probabilities, predict_probabilities, submission_frame, write_submission
from histo_transfer.evaluation.report import summary_text, write_report
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.registry import load_models
from histo_transfer.tracking.schema import (
    DATA_ROOT_TAG,
    EVALUATION_DIR,
    EXPLAIN_DIR,
    KIND_TAG,
    MODEL_REF_TAG,
    SOURCE_RUN_TAG,
    SUBMISSION_DIR,
    RunKind,
)

log = logging.getLogger(__name__)


def predict(cfg: DictConfig, context=None) -> Path:
    """Score the unlabelled test patches and write a checked submission.csv; returns its path."""
    experiment_id = tracking.setup(cfg.tracking)
    members = load_models(cfg.model, cfg.ensemble.top_k)
    source = data_source(cfg.data)
    root, patches = source.root(), source.holdout()
    if patches is None:
        raise ConfigError("data.root", f"{root} has no test patches to predict (test/ folder, or PCam's test split)")
    patches.usable("error")  # every test patch must be scored
    expected = _sample_submission_ids(root)
    tags = {KIND_TAG: RunKind.PREDICT.value, "tta": cfg.tta, DATA_ROOT_TAG: str(root), **model_tags(cfg, members)}
    with tracking.tracked_run(experiment_id, f"predict {cfg.data.name} tta={cfg.tta}", tags,
                              system_metrics=cfg.tracking.system_metrics):
        tracking.log_dataset(patches.ids, patches.labels, root, f"{cfg.data.name}-test",
                             patches.folder.name.rsplit("-", 1)[-1], "test")
        started = time.perf_counter()
        probabilities = ensemble_probabilities([m.model for m in members], patches.images, cfg.batch_size, cfg.tta,
                                               cfg.ensemble.method)
        seconds = time.perf_counter() - started
        frame = submission_frame(patches.ids, probabilities, expected)
        output = write_submission(frame, Path(cfg.output).expanduser().resolve())
        mlflow.log_artifact(str(output), SUBMISSION_DIR)
        mlflow.log_metrics({"n_predictions": len(frame), "mean_probability": float(frame["label"].mean()),
                            "images_per_second": len(frame) / max(seconds, 1e-9)})
    print(f"wrote {output}: {len(frame)} predictions (tta={cfg.tta}, {len(frame) / max(seconds, 1e-9):.0f} images/s)")
    return output


def evaluate(cfg: DictConfig, context=None) -> dict[str, float]:
    """Score a labelled data set: every labelled patch, the validation split, or PCam's official test split."""
    experiment_id = tracking.setup(cfg.tracking)
    members = load_models(cfg.model, cfg.ensemble.top_k)
    source = data_source(cfg.data)
    split = cfg.split if cfg.split != "auto" else ("test" if source.holdout_labelled else "all")
    if split == "test":
        if not source.holdout_labelled:
            raise ConfigError("split", f"split=test needs a data source with a labelled test split, such as "
                                       f"data=pcam_h5 (data={cfg.data.name}'s test patches have no labels)")
        root, patches = source.root(), source.holdout()
        if patches is None:
            raise ConfigError("data.root", f"{root} has no test split")
        indices = patches.usable(cfg.data.on_bad_image)
    elif split == "val":
        data = load_training_data(cfg.data)
        root, patches, indices = data.root, data.patches, data.val_indices
    else:
        labelled = source.labelled()
        root, patches = labelled.root, labelled.patches
        indices = patches.usable(cfg.data.on_bad_image)
    images = Rows(patches.images, indices)
    labels = patches.labels[indices]
    tags = {KIND_TAG: RunKind.EVALUATE.value, "tta": cfg.tta, "eval_split": split, DATA_ROOT_TAG: str(root),
            **model_tags(cfg, members)}
    with tracking.tracked_run(experiment_id, f"evaluate {cfg.data.name}:{split} tta={cfg.tta}", tags,
                              system_metrics=cfg.tracking.system_metrics), tempfile.TemporaryDirectory() as tmp:
        tracking.log_dataset(patches.ids[indices], labels, root, f"{cfg.data.name}-{split}",
                             patches.folder.name.rsplit("-", 1)[-1], "evaluation")  # the dataset's context
        started = time.perf_counter()
        probabilities = ensemble_probabilities([m.model for m in members], images, cfg.batch_size, cfg.tta,
                                               cfg.ensemble.method)
        seconds = time.perf_counter() - started  # the prediction cost of this model (all members, all views)
        try:
            # where one model looks; an ensemble's members each look elsewhere
            model = members[0].model
            explain = (lambda patches_: grad_cam(model, patches_)) if len(members) == 1 and explainable(model) else None
            metrics = write_report(labels, probabilities, images, Path(tmp) / EVALUATION_DIR, seed=cfg.data.seed,
                                   ids=patches.ids[indices], explain=explain)
        except ValueError as exc:
            raise DataError(f"{root}: {exc}") from exc
        mlflow.log_metrics({**{f"eval/{k}": v for k, v in metrics.items()},
                            "eval/images_per_second": len(indices) / max(seconds, 1e-9)})
        mlflow.log_artifacts(str(Path(tmp) / EVALUATION_DIR), EVALUATION_DIR)
    members_note = f", {len(members)} members ({cfg.ensemble.method})" if len(members) > 1 else ""
    print(summary_text(metrics, f"{cfg.model} on {root} ({split}, tta={cfg.tta}{members_note})"))
    return metrics


def explain(cfg: DictConfig, context=None) -> Path:
    """scripts/explain.py: each chosen patch, and the same patch under its Grad-CAM heat map."""
    import matplotlib  # here: its backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiment_id = tracking.setup(cfg.tracking)
    members = load_models(cfg.model)
    if len(members) != 1 or not explainable(members[0].model):
        raise ConfigError("model", f"{cfg.model} is not one classifier of this project; Grad-CAM explains one model")
    source = data_source(cfg.data)
    sets = [source.labelled().patches] + [p for p in [source.holdout()] if p is not None]
    wanted = [str(i) for i in cfg.ids]
    found = {}
    for patches in sets:
        position = {image_id: index for index, image_id in enumerate(patches.ids)}
        found.update({i: (patches, position[i]) for i in wanted if i in position and i not in found})
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ConfigError("ids", f"{missing[0]!r} is not a patch of {source.root()} ({len(missing)} not found)")
    images = np.stack([found[i][0].images[found[i][1]] for i in wanted])
    labels = [int(found[i][0].labels[found[i][1]]) for i in wanted]
    model = members[0].model
    probabilities, heat = predict_probabilities(model, images, progress=False), grad_cam(model, images)
    fig, axes = plt.subplots(2, len(wanted), figsize=(max(6.0, 2.2 * len(wanted)), 4.8), squeeze=False)
    for column, image_id in enumerate(wanted):
        overlay(axes[0, column], images[column], None)
        overlay(axes[1, column], images[column], heat[column])
        label = "?" if labels[column] < 0 else labels[column]
        axes[0, column].set_title(f"{image_id[:14]}\nlabel {label}, p={probabilities[column]:.2f}", fontsize=8)
    fig.suptitle("Grad-CAM: where the model looks\n(outlined: the centre 32x32 that defines the label)", fontsize=10)
    fig.tight_layout()
    output = Path(cfg.output).expanduser().resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    tags = {KIND_TAG: RunKind.EXPLAIN.value, DATA_ROOT_TAG: str(source.root()), **model_tags(cfg, members)}
    with tracking.tracked_run(experiment_id, f"explain {len(wanted)} patches", tags):
        mlflow.log_artifact(str(output), EXPLAIN_DIR)
    print(f"wrote {output}: Grad-CAM of {len(wanted)} patches")
    return output


def model_tags(cfg: DictConfig, members) -> dict[str, str]:
    """What was scored: the reference as given and, for an ensemble, its members' training runs."""
    tags = {MODEL_REF_TAG: str(cfg.model), "n_members": str(len(members))}
    if len(members) == 1 and members[0].source_run_id:
        tags[SOURCE_RUN_TAG] = members[0].source_run_id
    if len(members) > 1:
        tags["members"] = ",".join(m.source_run_id or m.ref for m in members)[:5000]
        tags["ensemble_method"] = cfg.ensemble.method
    return tags


def _sample_submission_ids(root: Path):
    """Ids in the order of Kaggle's sample_submission.csv, when the folder has one."""
    path = root / "sample_submission.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype=str)["id"].str.strip().tolist()
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a submission template with an id column ({exc})") from exc
