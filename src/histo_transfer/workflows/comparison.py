"""Recipes compared out of sample (scripts/compare_cv.py): CV runs side by side on their out-of-fold
predictions, each against the first with a paired bootstrap on the very same patches.

Two recipes' separate confidence intervals overlap long before their difference is noise: both
models find the same patches hard. Scoring both on each resample cancels that shared part.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from sklearn.metrics import roc_auc_score

from histo_transfer.config.errors import ConfigError
from histo_transfer.evaluation.report import bootstrap_auc_ci, paired_auc_difference
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.parent_runs import child_runs, varying_params
from histo_transfer.tracking.schema import KIND_TAG, OOF_ARTIFACT, RunKind, kind_filter

PLAIN = "probability"  # the out-of-fold predictions' column without test-time augmentation


def compare_from_config(cfg: DictConfig, context=None):
    """scripts/compare_cv.py: print the comparison of `cfg.runs` (the first is the baseline)."""
    tracking.setup(cfg.tracking, write=False)  # it only reads runs
    refs = list(cfg.runs) if not isinstance(cfg.runs, str) else [cfg.runs]
    runs = [run_id for ref in refs for run_id in cv_runs_of(str(ref))]
    if len(runs) < 2:
        raise ConfigError("runs", "give two or more CV parent run ids, the baseline first: 'runs=[BASELINE,OTHER]', "
                                  "or a sweep of cross-validations (`train.py -m cv=kfold ...`)")
    table = compare(runs, cfg.data.seed)
    print(markdown(table))
    return table


def compare(run_ids: list[str], seed: int = 0):
    """One row per CV run: what differs between the runs, wall time, out-of-fold AUC with its 95 % CI,
    and the paired difference from the first run (95 % CI, share of resamples ahead); the same again
    for every test-time augmentation the first run scored (cv.tta)."""
    runs, predictions = zip(*(_oof_predictions(run_id) for run_id in run_ids))
    return compare_predictions(list(runs), list(predictions), seed)


def compare_predictions(runs: list, predictions: list, seed: int = 0):
    """`compare` on runs and their out-of-fold predictions already loaded (id-indexed frames)."""
    baseline, first = predictions[0], runs[0].info.run_id
    for run, frame in zip(runs[1:], predictions[1:]):
        if not (frame.index.equals(baseline.index) and frame["label"].equals(baseline["label"])):
            raise ConfigError("runs", f"run {run.info.run_id} predicted other patches than {first} "
                                      f"({len(frame.index.symmetric_difference(baseline.index))} ids differ): "
                                      "compare cross-validations of the same data")
    labels = baseline["label"].to_numpy()
    columns = [PLAIN, *(c for c in baseline.columns if c.startswith(PLAIN + "_"))]  # probability_<tta>
    varying = _recipe_keys(varying_params(runs), runs)
    rows = []
    for run, frame in zip(runs, predictions):
        row = {"run": run.info.run_id,
               "recipe": ", ".join(f"{k}={run.data.params.get(k + '.name', run.data.params.get(k))}"
                                   for k in varying) or run.info.run_name,
               "wall_s": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else np.nan}
        for column in columns:
            name = _metric_name(column)
            if column not in frame:
                continue
            scores = frame[column].to_numpy()
            row[name] = float(roc_auc_score(labels, scores))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap_auc_ci(labels, scores, seed)
            difference = (0.0, 0.0, 0.0, 0.0) if frame is baseline else paired_auc_difference(  # itself: exactly 0
                labels, baseline[column].to_numpy(), scores, seed)
            row[f"{name}_diff"], row[f"{name}_diff_low"], row[f"{name}_diff_high"], row[f"{name}_ahead"] = difference
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table) -> str:
    """The comparison as a markdown table, as compare_cv.py prints it."""
    names = [c for c in table.columns if c.startswith("oof_auc") and not c.endswith(
        ("_ci_low", "_ci_high", "_diff", "_diff_low", "_diff_high", "_ahead"))]
    header = ["run", "recipe", "wall time"]
    for name in names:
        what = "out-of-fold AUC" + (f" with {name.removeprefix('oof_auc_')} TTA" if name != "oof_auc" else "")
        header += [f"{what} (95 % CI)", "minus the first run (95 % CI)", "resamples ahead"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for index, row in table.iterrows():
        cells = [f"`{row['run']}`", row["recipe"], f"{row['wall_s']:,.0f} s" if pd.notna(row["wall_s"]) else "-"]
        for name in names:
            if pd.isna(row.get(name)):
                cells += ["-", "-", "-"]
                continue
            cells.append(f"{row[name]:.4f} ({row[name + '_ci_low']:.4f}-{row[name + '_ci_high']:.4f})")
            cells += (["baseline", ""] if index == 0 else [
                f"{row[name + '_diff']:+.4f} ({row[name + '_diff_low']:+.4f} to {row[name + '_diff_high']:+.4f})",
                f"{row[name + '_ahead']:.0%}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cv_runs_of(ref: str) -> list[str]:
    """The CV parent runs a reference stands for: a sweep parent run (`train.py -m cv=kfold ...`)
    stands for its finished cross-validations in the order the jobs started (the first job is the
    baseline); any other run for itself (checked when its predictions are read)."""
    run = _run(ref)
    if run.data.tags.get(KIND_TAG) != RunKind.SWEEP:
        return [ref]
    jobs = child_runs(mlflow.tracking.MlflowClient(), run, f"{kind_filter(RunKind.CV)} and attributes.status = 'FINISHED'")
    if not jobs:
        raise ConfigError("runs", f"sweep {ref} has no finished cross-validation: sweep with cv=kfold")
    return [job.info.run_id for job in jobs]


def _oof_predictions(run_id: str):
    """(run, its cv/oof_predictions.csv indexed by id and sorted) of a finished CV parent run."""
    run = _run(run_id)
    if run.data.tags.get(KIND_TAG) != RunKind.CV or "oof_auc" not in run.data.metrics:
        raise ConfigError("runs", f"run {run_id} is not a finished cross-validation (a parent run with tag kind=cv "
                                  "and oof_auc; train.py cv=kfold makes one)")
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=OOF_ARTIFACT)
    return run, pd.read_csv(path, dtype={"id": str}).set_index("id").sort_index()


def _run(run_id: str):

    try:
        return mlflow.tracking.MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError("runs", f"no run {run_id} in {mlflow.get_tracking_uri()}") from None


def _recipe_keys(varying: list[str], runs) -> list[str]:
    """The varying config keys that make a recipe. A config group whose choice differs stands as
    `group=choice`, plus those of its keys every run has (options of one choice only are implied);
    where runs recorded and kept files (tracking.*, paths.*, *_dir) is no part of a recipe."""
    groups = {key.removesuffix(".name") for key in varying if key.endswith(".name")}
    keys = [key for key in varying if key.endswith(".name") or not (
        key.startswith(("tracking.", "paths.")) or key.endswith("_dir")
        or (key.rsplit(".", 1)[0] in groups and any(key not in run.data.params for run in runs)))]
    return [key.removesuffix(".name") if key.removesuffix(".name") in groups else key for key in keys]


def _metric_name(column: str) -> str:
    return "oof_auc" if column == PLAIN else "oof_auc_" + column.removeprefix(PLAIN + "_")

