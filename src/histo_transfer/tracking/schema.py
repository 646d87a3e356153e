"""The tracking schema: what this project writes into MLflow and reads back by name.

Run kinds, tag keys and artifact paths live here and only here, so the code that writes a run
(training, CV, sweeps, scoring) and the code that reads it back (model references, comparisons,
resumed sweeps) cannot drift apart. Plain strings: importing this module imports nothing heavy.
"""

from __future__ import annotations

from enum import Enum


class RunKind(str, Enum):
    """The `kind` tag of a run; a plain training run has none."""

    SWEEP = "sweep"  # a Hydra multirun's parent
    CV = "cv"  # a cross-validation's parent
    CV_FOLD = "cv-fold"  # one fold's training run
    KERAS_TUNER = "keras-tuner"  # a keras-tuner search's parent
    TRIAL = "trial"  # one keras-tuner trial
    PREDICT = "predict"
    EVALUATE = "evaluate"
    EXPLAIN = "explain"
    EXPORT = "export"  # a model reference exported as one model
    EDA = "eda"
    SLIDE = "slide"  # one whole-slide image scored by predict_slide.py
    SLIDE_FOLDER = "slide-folder"  # the parent of the slides of one folder or glob

    def __str__(self) -> str:
        return self.value


# Tags: MLflow's own
PARENT_TAG = "mlflow.parentRunId"  # nests a run under its parent in the UI
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (markdown)
GIT_COMMIT_TAG = "mlflow.source.git.commit"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the UI opens an experiment on runs, not on GenAI traces
EXPERIMENT_KIND = {EXPERIMENT_KIND_TAG: "custom_model_development"}  # what this project's experiments carry

# Tags: this project's
KIND_TAG = "kind"  # a RunKind
CONFIG_TAG = "config_key"  # config.identity.run_key of a training run's config
FOLD_TAG = "cv.fold"
BACKBONE_TAG = "backbone"
DATA_TAG = "data"
DATA_ROOT_TAG = "data_root"
DATASET_FINGERPRINT_TAG = "dataset_fingerprint"
WEIGHTS_SOURCE_TAG = "weights_source"
WEIGHTS_DIGEST_TAG = "weights_sha256"
MODEL_REF_TAG = "model_ref"
SOURCE_RUN_TAG = "source_run_id"
BEST_CHILD_TAG = "best_child_run_id"
BEST_IN_SWEEP_TAG = "best_in_sweep"
REGISTERED_MODEL_TAG = "registered_model"
SLIDE_PATH_TAG = "slide_path"
SLIDE_SOURCE_TAG = "slides"  # a slide folder's DIR or glob, as given
# a teacher as given, and the single models it stood for when the run started (aliases pinned)
DISTILL_TEACHER_TAGS = ("distill_teacher", "distill_teacher_members")
PSEUDO_TEACHER_TAGS = ("pseudo_teacher", "pseudo_teacher_members")

# Params every training run logs (its flattened config) that readers look up by name
OBJECTIVE_METRIC_PARAM = "objective.metric"
OBJECTIVE_MODE_PARAM = "objective.mode"

# Artifacts
MODEL_ARTIFACT = "model/model.keras"  # a training run's best model
MODEL_SUMMARY_ARTIFACT = "model/summary.txt"
LOGGED_MODEL_NAME = "classifier"  # the MLflow-logged (servable) model of a training run
CONFIG_ARTIFACT = "config/config.yaml"
OVERRIDES_ARTIFACT = "config/overrides.yaml"
ERROR_ARTIFACT = "error.txt"  # a failed run's traceback, redacted
EVALUATION_DIR = "evaluation"  # evaluation report: plots, metrics, predictions
PREDICTIONS_ARTIFACT = f"{EVALUATION_DIR}/predictions.csv"
PLOTS_DIR = "plots"
PROFILE_DIR = "profile"
CHECKPOINTS_DIR = "checkpoints"  # tracking.upload_checkpoints: the last two epochs' states, while the run is unfinished
SUMMARY_DIR = "summary"  # a parent run's summary table and plots
CV_DIR = "cv"
FOLDS_ARTIFACT = f"{CV_DIR}/folds.csv"
OOF_ARTIFACT = f"{CV_DIR}/oof_predictions.csv"
BAD_IMAGES_ARTIFACT = "data/bad_images.tsv"
UNLISTED_FILES_ARTIFACT = "data/unlisted_files.txt"
SUBMISSION_DIR = "submission"
EXPLAIN_DIR = "explain"
EDA_DIR = "eda"
SLIDE_DIR = "slide"  # a slide run's outputs, the same files as in its output= folder
SLIDE_PROBABILITY_PNG = "probability_map.png"
SLIDE_PROBABILITY_NPY = "probability_map.npy"
SLIDE_OVERLAY_PNG = "overlay.png"
SLIDE_TILES_CSV = "tiles.csv"
SLIDE_REGIONS_GEOJSON = "tumour_regions.geojson"
SLIDE_UNREADABLE_CSV = "unreadable_regions.csv"  # only when some were
SLIDE_SUMMARY_ARTIFACT = f"{SUMMARY_DIR}/slides.csv"  # a slide folder's table, most suspicious first


def kind_filter(kind: RunKind) -> str:
    """An MLflow search filter for runs of `kind`."""
    return f"tags.{KIND_TAG} = '{kind.value}'"
