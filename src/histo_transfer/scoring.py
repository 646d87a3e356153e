"""predict.py and evaluate.py: score patches with a trained model, recorded as MLflow runs."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from histo_transfer.config import validate
from histo_transfer.errors import ConfigError, DataError
from histo_transfer.inference import TTA

log = logging.getLogger(__name__)


class Subset:
    """Rows `indices` of an image array, read one batch at a time (the memory map stays on disk)."""

    def __init__(self, images, indices: np.ndarray):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        return self.images[self.indices[item]]


def predict(cfg: DictConfig, context=None) -> Path:
    """Score the unlabelled test patches and write a checked submission.csv; returns its path."""
    _check(cfg)
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.data.sources import data_source
    from histo_transfer.inference import predict_probabilities, submission_frame, write_submission
    from histo_transfer.registry import load_model

    experiment_id = tracking.setup(cfg.tracking)
    loaded = load_model(cfg.model)
    source = data_source(cfg.data)
    root, patches = source.root(), source.holdout()
    if patches is None:
        raise ConfigError("data.root", f"{root} has no test patches to predict (test/ folder, or PCam's test split)")
    patches.usable("error")  # every test patch must be scored
    expected = _sample_submission_ids(root)
    tags = {"kind": "predict", "model_ref": str(cfg.model), "tta": cfg.tta, "data_root": str(root)}
    if loaded.source_run_id:
        tags["source_run_id"] = loaded.source_run_id
    with tracking.tracked_run(experiment_id, f"predict {cfg.data.name} tta={cfg.tta}", tags):
        started = time.perf_counter()
        probabilities = predict_probabilities(loaded.model, patches.images, cfg.batch_size, cfg.tta)
        seconds = time.perf_counter() - started
        frame = submission_frame(patches.ids, probabilities, expected)
        output = write_submission(frame, Path(cfg.output).expanduser().resolve())
        mlflow.log_artifact(str(output), "submission")
        mlflow.log_metrics({"n_predictions": len(frame), "mean_probability": float(frame["label"].mean()),
                            "images_per_second": len(frame) / max(seconds, 1e-9)})
    print(f"wrote {output}: {len(frame)} predictions (tta={cfg.tta}, {len(frame) / max(seconds, 1e-9):.0f} images/s)")
    return output


def evaluate(cfg: DictConfig, context=None) -> dict[str, float]:
    """Score a labelled data set: every labelled patch, the validation split, or PCam's official test split."""
    _check(cfg)
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.data.loading import load_training_data
    from histo_transfer.data.sources import data_source
    from histo_transfer.evaluation import summary_text, write_report
    from histo_transfer.inference import predict_probabilities
    from histo_transfer.registry import load_model

    experiment_id = tracking.setup(cfg.tracking)
    loaded = load_model(cfg.model)
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
    images = Subset(patches.images, indices)
    labels = patches.labels[indices]
    tags = {"kind": "evaluate", "model_ref": str(cfg.model), "tta": cfg.tta, "eval_split": split,
            "data_root": str(root)}
    if loaded.source_run_id:
        tags["source_run_id"] = loaded.source_run_id
    with tracking.tracked_run(experiment_id, f"evaluate {cfg.data.name}:{split} tta={cfg.tta}", tags), \
            tempfile.TemporaryDirectory() as tmp:
        probabilities = predict_probabilities(loaded.model, images, cfg.batch_size, cfg.tta)
        try:
            metrics = write_report(labels, probabilities, images, Path(tmp) / "evaluation", seed=cfg.data.seed)
        except ValueError as exc:
            raise DataError(f"{root}: {exc}") from exc
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        mlflow.log_artifacts(str(Path(tmp) / "evaluation"), "evaluation")
    print(summary_text(metrics, f"{cfg.model} on {root} ({split}, tta={cfg.tta})"))
    return metrics


def _check(cfg: DictConfig) -> None:
    validate(cfg)
    TTA.validate_name(cfg.tta, "tta")
    if cfg.get("split") is not None and cfg.split not in ("auto", "all", "val", "test"):
        raise ConfigError("split", f"{cfg.split!r} is not one of auto, all, val, test")


def _sample_submission_ids(root: Path):
    """Ids in the order of Kaggle's sample_submission.csv, when the folder has one."""
    import pandas as pd

    path = root / "sample_submission.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype=str)["id"].str.strip().tolist()
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a submission template with an id column ({exc})") from exc
