"""k-fold cross-validation (config group `cv`): one MLflow parent run (tag kind=cv) with one nested,
complete training run per fold, and the out-of-fold predictions as the recipe's honest score.

The parent's id is recorded beside the checkpoints, keyed by the config without `cv.fold`, so an
interrupted CV resumes into the same parent (trainer.resume=true), and single-fold jobs of a
launcher (`-m cv.fold=0,1,2,3,4`) share one parent: the job that finishes the last fold summarises.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig, open_dict

from histo_transfer.context import RunContext
from histo_transfer.data.cache import Rows
from histo_transfer.errors import ConfigError
from histo_transfer.inference import TTA
from histo_transfer.options import Options, between, one_of

log = logging.getLogger(__name__)

FOLD_TAG = "cv.fold"


@dataclass
class KFoldKeys:
    name: str
    folds: int = between(2)
    fold: Optional[int] = between(0)  # null: every fold in this process
    tta: str = one_of(TTA)  # also score the out-of-fold predictions with this test-time augmentation


def _check(node, assign) -> None:
    if node.fold is not None and node.fold >= node.folds:
        raise ConfigError("cv.fold", f"{node.fold} is out of range; need 0 <= fold < cv.folds={node.folds}")


CV = Options("cv", check=_check)


@CV.register("kfold", KFoldKeys)
def kfold(cfg, labels: np.ndarray, groups: np.ndarray | None, seed: int) -> np.ndarray:
    """Stratified by label, seeded; grouped by slide when `groups` is known."""
    from histo_transfer.data.folds import assign_folds

    return assign_folds(labels, groups, cfg.folds, seed)


def cross_validate(cfg: DictConfig, context: RunContext) -> float:
    """Run the folds (all, or cv.fold alone); returns the out-of-fold AUC once every fold is done,
    otherwise this fold's objective value."""
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.data.sources import data_source
    from histo_transfer.objective import Objective
    from histo_transfer.training_run import Fold, run_training

    objective = Objective.from_config(cfg.objective)
    experiment_id = tracking.setup(cfg.tracking)
    source = data_source(cfg.data)
    labelled = source.labelled()
    patches = labelled.patches
    pool = source.cv_pool(patches, patches.usable(cfg.data.on_bad_image))
    groups = source.groups(labelled)
    if groups is None:
        log.warning("the slide of each patch is unknown: folds are stratified but not grouped, so patches of one "
                    "slide may be in training and validation (data.groups_csv, or PCam's *_meta.csv, fixes it)")
    of_patch = np.full(len(patches.ids), -1, dtype=np.int64)
    of_patch[pool] = CV[cfg.cv.name](cfg.cv, patches.labels[pool], None if groups is None else groups[pool],
                                     cfg.data.seed)
    whole = _without_fold(cfg)
    single = cfg.cv.fold is not None
    with _parent_lock(whole) as record:
        parent = _parent_run(record, whole, cfg, experiment_id, context, objective, groups is not None,
                             reuse=cfg.trainer.resume or single)
        if not single or not _artifact_exists(parent.run_id, "cv/folds.csv"):
            _log_folds(parent.run_id, patches.ids[pool], of_patch[pool])
    todo = [cfg.cv.fold] if single else list(range(cfg.cv.folds))
    done = _finished_folds(parent)
    values = {}
    active = contextlib.nullcontext() if single else tracking.tracked_run(experiment_id, None, {},
                                                                            run_id=parent.run_id)
    with active:
        for number in todo:
            if number in done:
                log.info("fold %d of CV %s is already finished: kept", number, parent.run_id)
                continue
            outcome = run_training(_with_fold(cfg, number), context, parent_run_id=parent.run_id,
                                   fold=Fold(number, of_patch), tags={FOLD_TAG: str(number), "kind": "cv-fold"},
                                   run_name=f"fold {number}", nested=not single)
            values[number] = outcome.objective_value
        with _parent_lock(whole):
            finished = _finished_folds(parent)
            if len(finished) == cfg.cv.folds and not _artifact_exists(parent.run_id, "cv/oof_predictions.csv"):
                result = summarise(parent, finished, patches, cfg)
                if single:
                    parent.end("FINISHED")
                return result
    if single and number in values:
        return values[number]
    return float(mlflow.get_run(parent.run_id).data.metrics.get("oof_auc", np.nan))


def summarise(parent, folds: dict[int, object], patches, cfg) -> float:
    """Out-of-fold predictions, their evaluation report, per-fold scores; returns the OOF AUC."""
    import mlflow
    import pandas as pd

    from sklearn.metrics import roc_auc_score

    from histo_transfer.evaluation import bootstrap_auc_ci, write_report

    client = parent.client
    frames = []
    for number, child in sorted(folds.items()):
        path = mlflow.artifacts.download_artifacts(run_id=child.info.run_id,
                                                   artifact_path="evaluation/predictions.csv")
        frames.append(pd.read_csv(path, dtype={"id": str}).assign(fold=number))
    oof = pd.concat(frames, ignore_index=True)[["id", "label", "fold", "probability"]]
    per_fold = np.array([folds[k].data.metrics.get("best_val_auc", np.nan) for k in sorted(folds)])
    labels, probabilities = oof["label"].to_numpy(), oof["probability"].to_numpy()
    oof_auc = float(roc_auc_score(labels, probabilities))
    low, high = bootstrap_auc_ci(labels, probabilities, cfg.data.seed)
    index = {image_id: position for position, image_id in enumerate(patches.ids)}
    positions = np.array([index[image_id] for image_id in oof["id"]])
    order = np.argsort(positions)  # in cache order: sequential reads of the memory map
    images = Rows(patches.images, positions[order])
    tta_scores = {}
    if cfg.cv.tta != "none":  # each fold's model again on its own fold, with test-time augmentation
        oof[f"probability_{cfg.cv.tta}"] = _oof_with_tta(folds, oof, positions, patches, cfg.cv.tta)
        with_tta = oof[f"probability_{cfg.cv.tta}"].to_numpy()
        tta_low, tta_high = bootstrap_auc_ci(labels, with_tta, cfg.data.seed)
        tta_scores = {"oof_auc_tta": float(roc_auc_score(labels, with_tta)), "oof_auc_tta_ci_low": tta_low,
                      "oof_auc_tta_ci_high": tta_high}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        oof.to_csv(out / "oof_predictions.csv", index=False)
        plot_folds(per_fold, oof_auc, out / "folds.png")
        client.log_artifact(parent.run_id, str(out / "oof_predictions.csv"), "cv")
        client.log_artifact(parent.run_id, str(out / "folds.png"), "cv")
        metrics = write_report(labels[order], probabilities[order], images, out / "evaluation", seed=cfg.data.seed,
                               ids=oof["id"].to_numpy()[order])
        client.log_artifacts(parent.run_id, str(out / "evaluation"), "evaluation")
    scores = {"cv_auc_mean": float(np.nanmean(per_fold)), "cv_auc_std": float(np.nanstd(per_fold)),
              "oof_auc": oof_auc, "oof_auc_ci_low": low, "oof_auc_ci_high": high,
              # what sweeps over recipes rank by: the honest out-of-fold number, not one fold's best epoch
              "best_val_auc": oof_auc, **tta_scores, **{f"eval/{k}": v for k, v in metrics.items()}}
    for key, value in scores.items():
        client.log_metric(parent.run_id, key, value)
    tta = (f" With {cfg.cv.tta} test-time augmentation: **{tta_scores['oof_auc_tta']:.4f}** "
           f"({tta_scores['oof_auc_tta_ci_low']:.4f}-{tta_scores['oof_auc_tta_ci_high']:.4f})." if tta_scores else "")
    client.set_tag(parent.run_id, "mlflow.note.content", "\n".join([
        f"{len(folds)}-fold cross-validation of **{cfg.backbone.name}** on **{cfg.data.name}** ({len(oof):,} patches). "
        f"Out-of-fold AUC **{oof_auc:.4f}** (95 % CI {low:.4f}-{high:.4f}).{tta}", "",
        "| fold | run | val AUC (best epoch) |", "| --- | --- | --- |",
        *[f"| {k} | `{folds[k].info.run_id}` | {v:.4f} |" for k, v in zip(sorted(folds), per_fold)],
        f"| mean +- std | | {np.nanmean(per_fold):.4f} +- {np.nanstd(per_fold):.4f} |"]))
    log.info("CV %s: out-of-fold AUC %.4f (95 %% CI %.4f-%.4f), folds %.4f +- %.4f", parent.run_id, oof_auc, low,
             high, scores["cv_auc_mean"], scores["cv_auc_std"])
    return oof_auc


def _oof_with_tta(folds: dict, oof, positions: np.ndarray, patches, tta: str) -> np.ndarray:
    from histo_transfer.inference import predict_probabilities
    from histo_transfer.registry import load_model

    out = np.zeros(len(oof), dtype=np.float32)
    for number, child in folds.items():
        rows = np.flatnonzero(oof["fold"].to_numpy() == number)
        model = load_model(child.info.run_id).model
        out[rows] = predict_probabilities(model, patches.images[positions[rows]], tta=tta, progress=False)
    return out


def plot_folds(per_fold: np.ndarray, oof_auc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(per_fold) + 2), 4))
    bars = ax.bar([f"fold {k}" for k in range(len(per_fold))], per_fold, color="#7a9cc6")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.axhline(np.nanmean(per_fold), color="grey", linestyle="--", label=f"mean of folds {np.nanmean(per_fold):.3f}")
    ax.axhline(oof_auc, color="#c66b7a", label=f"out-of-fold AUC {oof_auc:.3f}")
    ax.set(ylabel="validation AUC (best epoch)", title="Cross-validation", ylim=(max(0, np.nanmin(per_fold) - 0.1), 1))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _without_fold(cfg: DictConfig) -> DictConfig:
    whole = cfg.copy()
    with open_dict(whole):
        whole.cv.fold = None
    return whole


def _with_fold(cfg: DictConfig, number: int) -> DictConfig:
    fold = cfg.copy()
    with open_dict(fold):
        fold.cv.fold = number
    return fold


@contextlib.contextmanager
def _parent_lock(whole: DictConfig):
    """An exclusive lock per CV (jobs of one launcher may start together); yields its record file."""
    from histo_transfer.checkpoints import run_key
    from histo_transfer.parent_runs import PARENT_RUN_FILE

    folder = Path(whole.trainer.checkpoint_dir).expanduser().resolve() / f"cv-{run_key(whole)}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder / PARENT_RUN_FILE
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _parent_run(record: Path, whole, cfg, experiment_id, context, objective, grouped: bool, reuse: bool):
    from histo_transfer import tracking
    from histo_transfer.parent_runs import PARENT_TAG, ParentRun, record_parent, recorded_parent

    previous = recorded_parent(record) if reuse else None
    if previous:
        log.info("continuing CV %s", previous)
        # single-fold jobs run side by side: another job's RUNNING fold is alive, not left over
        return ParentRun.resume(previous, objective, only_this_process=cfg.cv.fold is None)
    tags = {"kind": "cv", "cv.folds": str(cfg.cv.folds), "cv.grouped": str(grouped).lower(),
            "backbone": cfg.backbone.name, "data": cfg.data.name,
            "mlflow.source.git.commit": tracking.git_commit(Path(cfg.paths.root_dir))}
    if context.parent_run_id:
        tags[PARENT_TAG] = context.parent_run_id
    name = "cv " + (cfg.tracking.run_name or tracking.run_name_from_overrides(
        [o for o in context.overrides if not o.startswith(("cv.fold", "trainer.resume"))]))
    parent = ParentRun.create(experiment_id, name, tags, objective, params=tracking.flat_params(whole),
                              only_this_process=cfg.cv.fold is None)
    record_parent(record, parent)
    return parent


def _log_folds(run_id: str, ids: np.ndarray, folds: np.ndarray) -> None:
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame({"id": ids, "fold": folds}).to_csv(Path(tmp) / "folds.csv", index=False)
        mlflow.tracking.MlflowClient().log_artifact(run_id, str(Path(tmp) / "folds.csv"), "cv")


def _finished_folds(parent) -> dict[int, object]:
    """Fold number -> its FINISHED child run."""
    return {int(child.data.tags[FOLD_TAG]): child for child in parent.children()
            if child.info.status == "FINISHED" and FOLD_TAG in child.data.tags}


def _artifact_exists(run_id: str, path: str) -> bool:
    import mlflow

    folder, _, name = path.rpartition("/")
    return any(item.path == path for item in mlflow.tracking.MlflowClient().list_artifacts(run_id, folder))

