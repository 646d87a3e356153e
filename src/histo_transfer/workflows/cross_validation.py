"""k-fold cross-validation (config group `cv`): one MLflow parent run (tag kind=cv) with one nested,
complete training run per fold, and the out-of-fold predictions as the recipe's honest score.

The parent's id is recorded beside the checkpoints, keyed by the config without `cv.fold`, so an
interrupted CV resumes into the same parent (trainer.resume=true), and single-fold jobs of a
launcher (`-m cv.fold=0,1,2,3,4`) share one parent: the job that finishes the last fold summarises.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict
from sklearn.metrics import roc_auc_score

from histo_transfer.config.context import RunContext
from histo_transfer.config.identity import run_key
from histo_transfer.config.objective import Objective
from histo_transfer.data.cache import PackedPatches, Rows
from histo_transfer.data.sources import data_source
from histo_transfer.evaluation.inference import predict_probabilities
from histo_transfer.evaluation.report import bootstrap_auc_ci, write_report
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.parent_runs import PARENT_RUN_FILE, NewParent, ParentRun, record_lock
from histo_transfer.tracking.registry import load_model
from histo_transfer.tracking.schema import (
    BACKBONE_TAG,
    CV_DIR,
    DATA_TAG,
    EVALUATION_DIR,
    FOLD_TAG,
    FOLDS_ARTIFACT,
    GIT_COMMIT_TAG,
    KIND_TAG,
    NOTE_TAG,
    OOF_ARTIFACT,
    PARENT_TAG,
    PREDICTIONS_ARTIFACT,
    RunKind,
)
from histo_transfer.workflows.cv_schemes import CV
from histo_transfer.workflows.training_run import Fold, run_training

log = logging.getLogger(__name__)


def cross_validate(cfg: DictConfig, context: RunContext) -> float:
    """Run the folds (all, or cv.fold alone); returns the out-of-fold AUC once every fold is done,
    otherwise this fold's objective value."""
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
    record = _parent_record(whole)
    parent = ParentRun.open(
        record, Objective.from_config(cfg.objective), lambda: _new_parent(whole, cfg, experiment_id, context, groups),
        resume=cfg.trainer.resume or single,
        only_this_process=not single,  # single-fold jobs run side by side: another job's RUNNING fold is alive
        on_create=lambda created: _log_folds(created.run_id, patches.ids[pool], of_patch[pool]))
    todo = [cfg.cv.fold] if single else list(range(cfg.cv.folds))
    done = _finished_folds(parent)
    values = {}
    with (tracking.tracked_run(experiment_id, None, {}, run_id=parent.run_id) if not single else contextlib.nullcontext()):
        for number in todo:
            if number in done:
                log.info("fold %d of CV %s is already finished: kept", number, parent.run_id)
                continue
            outcome = run_training(_with_fold(cfg, number), context, parent_run_id=parent.run_id,
                                   fold=Fold(number, of_patch),
                                   tags={FOLD_TAG: str(number), KIND_TAG: RunKind.CV_FOLD.value},
                                   run_name=f"fold {number}", nested=not single)
            values[number] = outcome.objective_value
        with record_lock(record):  # the job that finishes the last fold summarises, once
            finished = _finished_folds(parent)
            if len(finished) == cfg.cv.folds and not _artifact_exists(parent.run_id, OOF_ARTIFACT):
                result = _summarise(parent, finished, patches, cfg)
                if single:
                    parent.end("FINISHED")
                return result
    if single and cfg.cv.fold in values:
        return values[cfg.cv.fold]
    return float(mlflow.get_run(parent.run_id).data.metrics.get("oof_auc", np.nan))


@dataclass
class OofReport:
    """A finished CV's honest score: the out-of-fold predictions and what they say."""

    predictions: pd.DataFrame  # id, label, fold, probability (and probability_<tta>)
    per_fold: np.ndarray  # each fold's best-epoch validation AUC, by fold number
    scores: dict[str, float]  # oof_auc with its CI, mean and std of the folds, the same with TTA
    tta: str = "none"
    order: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))  # rows in cache order
    positions: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))  # rows' cache positions


def oof_report(fold_predictions: dict[int, pd.DataFrame], fold_aucs: dict[int, float], patch_ids: np.ndarray,
               seed: int, tta: str = "none", predict_with_tta=None) -> OofReport:
    """Pure: the folds' validation predictions (id, label, probability) assembled into out-of-fold
    predictions, their AUC with a bootstrap 95 % CI, and the folds' spread. `predict_with_tta(oof,
    positions)`, when `tta` is not none, re-scores every patch with its own fold's model."""
    frames = [fold_predictions[number].assign(fold=number) for number in sorted(fold_predictions)]
    oof = pd.concat(frames, ignore_index=True)[["id", "label", "fold", "probability"]]
    per_fold = np.array([fold_aucs.get(number, np.nan) for number in sorted(fold_predictions)])
    labels, probabilities = oof["label"].to_numpy(), oof["probability"].to_numpy()
    oof_auc = float(roc_auc_score(labels, probabilities))
    low, high = bootstrap_auc_ci(labels, probabilities, seed)
    scores = {"cv_auc_mean": float(np.nanmean(per_fold)), "cv_auc_std": float(np.nanstd(per_fold)),
              "oof_auc": oof_auc, "oof_auc_ci_low": low, "oof_auc_ci_high": high,
              # what sweeps over recipes rank by: the honest out-of-fold number, not one fold's best epoch
              "best_val_auc": oof_auc}
    index = {image_id: position for position, image_id in enumerate(patch_ids)}
    positions = np.array([index[image_id] for image_id in oof["id"]], dtype=np.int64)
    if tta != "none" and predict_with_tta is not None:
        oof[f"probability_{tta}"] = predict_with_tta(oof, positions)
        with_tta = oof[f"probability_{tta}"].to_numpy()
        tta_low, tta_high = bootstrap_auc_ci(labels, with_tta, seed)
        scores.update({"oof_auc_tta": float(roc_auc_score(labels, with_tta)), "oof_auc_tta_ci_low": tta_low,
                       "oof_auc_tta_ci_high": tta_high})
    return OofReport(oof, per_fold, scores, tta, np.argsort(positions), positions)


def describe(report: OofReport, folds: dict[int, object], backbone: str, data: str) -> str:
    """The CV parent's description in the UI (markdown)."""
    scores, per_fold = report.scores, report.per_fold
    tta = (f" With {report.tta} test-time augmentation: **{scores['oof_auc_tta']:.4f}** "
           f"({scores['oof_auc_tta_ci_low']:.4f}-{scores['oof_auc_tta_ci_high']:.4f})."
           if "oof_auc_tta" in scores else "")
    return "\n".join([
        f"{len(folds)}-fold cross-validation of **{backbone}** on **{data}** ({len(report.predictions):,} patches). "
        f"Out-of-fold AUC **{scores['oof_auc']:.4f}** (95 % CI {scores['oof_auc_ci_low']:.4f}-"
        f"{scores['oof_auc_ci_high']:.4f}).{tta}", "",
        "| fold | run | val AUC (best epoch) |", "| --- | --- | --- |",
        *[f"| {k} | `{folds[k].info.run_id}` | {v:.4f} |" for k, v in zip(sorted(folds), per_fold)],
        f"| mean +- std | | {np.nanmean(per_fold):.4f} +- {np.nanstd(per_fold):.4f} |"])


def _summarise(parent: ParentRun, folds: dict[int, object], patches: PackedPatches, cfg: DictConfig) -> float:
    """The out-of-fold report of the finished folds, logged to the CV's parent run; returns the OOF AUC."""
    fold_predictions = {
        number: pd.read_csv(mlflow.artifacts.download_artifacts(run_id=child.info.run_id,
                                                                artifact_path=PREDICTIONS_ARTIFACT), dtype={"id": str})
        for number, child in folds.items()}
    report = oof_report(fold_predictions, {k: c.data.metrics.get("best_val_auc", np.nan) for k, c in folds.items()},
                        patches.ids, cfg.data.seed, cfg.cv.tta,
                        lambda oof, positions: _oof_with_tta(folds, oof, positions, patches, cfg.cv.tta))
    _log_report(parent, report, folds, patches, cfg)
    scores = report.scores
    log.info("CV %s: out-of-fold AUC %.4f (95 %% CI %.4f-%.4f), folds %.4f +- %.4f", parent.run_id, scores["oof_auc"],
             scores["oof_auc_ci_low"], scores["oof_auc_ci_high"], scores["cv_auc_mean"], scores["cv_auc_std"])
    return scores["oof_auc"]


def _log_report(parent: ParentRun, report: OofReport, folds: dict[int, object], patches: PackedPatches,
                cfg: DictConfig) -> None:
    """The report's predictions, fold plot, evaluation report (in cache order: sequential reads of the
    memory map), metrics and description, into the parent run."""
    client, oof, order = parent.client, report.predictions, report.order
    labels, probabilities = oof["label"].to_numpy(), oof["probability"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        oof.to_csv(out / Path(OOF_ARTIFACT).name, index=False)
        plot_folds(report.per_fold, report.scores["oof_auc"], out / "folds.png")
        client.log_artifact(parent.run_id, str(out / Path(OOF_ARTIFACT).name), CV_DIR)
        client.log_artifact(parent.run_id, str(out / "folds.png"), CV_DIR)
        metrics = write_report(labels[order], probabilities[order], Rows(patches.images, report.positions[order]),
                               out / EVALUATION_DIR, seed=cfg.data.seed, ids=oof["id"].to_numpy()[order])
        client.log_artifacts(parent.run_id, str(out / EVALUATION_DIR), EVALUATION_DIR)
    for key, value in {**report.scores, **{f"eval/{k}": v for k, v in metrics.items()}}.items():
        client.log_metric(parent.run_id, key, value)
    client.set_tag(parent.run_id, NOTE_TAG, describe(report, folds, cfg.backbone.name, cfg.data.name))


def _oof_with_tta(folds: dict, oof, positions: np.ndarray, patches, tta: str) -> np.ndarray:
    """Each fold's model again on its own fold, with test-time augmentation."""
    out = np.zeros(len(oof), dtype=np.float32)
    for number, child in folds.items():
        rows = np.flatnonzero(oof["fold"].to_numpy() == number)
        model = load_model(child.info.run_id).model
        out[rows] = predict_probabilities(model, patches.images[positions[rows]], tta=tta, progress=False)
    return out


def plot_folds(per_fold: np.ndarray, oof_auc: float, path: Path) -> None:
    import matplotlib  # here: its backend is chosen before pyplot loads

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


def _parent_record(whole: DictConfig) -> Path:
    """Where a CV's parent run id is kept: beside the checkpoints, keyed by the config without cv.fold."""
    return Path(whole.trainer.checkpoint_dir).expanduser().resolve() / f"cv-{run_key(whole)}" / PARENT_RUN_FILE


def _new_parent(whole: DictConfig, cfg: DictConfig, experiment_id: str, context: RunContext, groups) -> NewParent:
    tags = {KIND_TAG: RunKind.CV.value, "cv.folds": str(cfg.cv.folds), "cv.grouped": str(groups is not None).lower(),
            BACKBONE_TAG: cfg.backbone.name, DATA_TAG: cfg.data.name,
            GIT_COMMIT_TAG: tracking.git_commit(Path(cfg.paths.root_dir))}
    if context.parent_run_id:
        tags[PARENT_TAG] = context.parent_run_id
    name = f"cv {cfg.tracking.run_name}" if cfg.tracking.run_name else tracking.run_name_from_overrides(
        [o for o in context.overrides if not o.startswith(("cv.fold", "trainer.resume"))], prefix="cv ")
    return NewParent(experiment_id, name, tags, tracking.flat_params(whole))


def _log_folds(run_id: str, ids: np.ndarray, folds: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(FOLDS_ARTIFACT).name
        pd.DataFrame({"id": ids, "fold": folds}).to_csv(path, index=False)
        mlflow.tracking.MlflowClient().log_artifact(run_id, str(path), CV_DIR)


def _finished_folds(parent) -> dict[int, object]:
    """Fold number -> its FINISHED child run."""
    return {int(child.data.tags[FOLD_TAG]): child for child in parent.children()
            if child.info.status == "FINISHED" and FOLD_TAG in child.data.tags}


def _artifact_exists(run_id: str, path: str) -> bool:
    folder, _, name = path.rpartition("/")
    return any(item.path == path for item in mlflow.tracking.MlflowClient().list_artifacts(run_id, folder))

