"""Evaluation report: every score checked against a hand computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from histo_transfer.evaluation.report import (
    bootstrap_auc_ci,
    calibration,
    paired_auc_difference,
    resampled_aucs,
    summary_text,
    threshold_metrics,
    write_report,
)

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
PROBS = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.6, 0.7, 0.9])


def test_threshold_metrics_count_by_hand():
    scores, matrix = threshold_metrics(LABELS, PROBS, 0.5)
    assert matrix == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert scores == {"accuracy": 0.75, "sensitivity": 0.75, "specificity": 0.75}


def test_calibration_ece_and_brier_by_hand():
    labels, probs = np.array([0, 1, 1, 0]), np.array([0.05, 0.05, 0.95, 0.95])
    ece, brier, table = calibration(labels, probs)
    # two bins, each: confidence 0.05 or 0.95, observed 0.5 -> |gap| 0.45, weight 1/2 each
    assert ece == pytest.approx(0.45) and brier == pytest.approx((0.05**2 + 0.95**2 + 0.05**2 + 0.95**2) / 4)
    assert [(row[0], row[1]) for row in table] == [(0.05, 2), (0.95, 2)]  # bin centre, patches


def test_bootstrap_interval_brackets_the_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 400), 0, 1)
    low, high = bootstrap_auc_ci(labels, probs)
    assert low < roc_auc_score(labels, probs) < high and high - low < 0.15


def test_resampled_aucs_are_roc_auc_score_on_each_resample_ties_included():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 30)
    scores = np.round(rng.random(30) + 0.3 * labels, 1)  # many tied scores, across labels too
    picks = np.random.default_rng(5).integers(0, 30, (200, 30))
    expected = [roc_auc_score(labels[p], scores[p]) for p in picks if 0 < labels[p].sum() < 30]
    (aucs,) = resampled_aucs(labels, [scores], seed=5, samples=200, cells=30 * 7)  # chunks of 7 resamples
    assert len(aucs) == len(expected) and np.allclose(aucs, expected, atol=1e-12)
    few = resampled_aucs(np.array([0, 1, 1]), [np.array([0.2, 0.1, 0.9])], seed=0, samples=50)[0]
    assert 0 < len(few) < 50 and set(np.round(few, 6)) <= {0.0, 0.5, 1.0}  # one-class draws are skipped


def test_paired_difference_is_tighter_than_two_separate_intervals():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    hardness = rng.normal(0, 1, 600)  # what both models share
    baseline = labels + hardness + rng.normal(0, 0.3, 600)
    candidate = labels * 1.15 + hardness + rng.normal(0, 0.3, 600)  # a little better on the same patches
    difference, low, high, ahead = paired_auc_difference(labels, baseline, candidate, seed=1)
    assert difference == pytest.approx(roc_auc_score(labels, candidate) - roc_auc_score(labels, baseline))
    assert 0 < low < difference < high and ahead > 0.975  # the gain is real ...
    base_low, base_high = bootstrap_auc_ci(labels, baseline, seed=1)
    assert base_low < roc_auc_score(labels, candidate) < base_high  # ... though the separate intervals overlap
    assert high - low < (base_high - base_low) / 2
    assert paired_auc_difference(labels, baseline, baseline) == (0.0, 0.0, 0.0, 0.0)  # a model against itself


def test_recipe_names_a_changed_group_once_and_leaves_out_where_files_go():
    from types import SimpleNamespace

    from histo_transfer.workflows.comparison import _recipe_keys

    def run(**params):
        return SimpleNamespace(data=SimpleNamespace(params=params))

    runs = [run(**{"augmentation.name": "basic", "optimizer.lr": "0.001", "paths.output_dir": "/a", "data.cache_dir": "/a/c"}),
            run(**{"augmentation.name": "pathology", "augmentation.hue": "0.04", "optimizer.lr": "0.01",
                   "paths.output_dir": "/b", "data.cache_dir": "/b/c"})]
    varying = ["augmentation.hue", "augmentation.name", "data.cache_dir", "optimizer.lr", "paths.output_dir"]
    assert _recipe_keys(varying, runs) == ["augmentation", "optimizer.lr"]


def test_report_writes_every_figure_and_table(tmp_path):
    images = np.zeros((8, 96, 96, 3), np.uint8)
    metrics = write_report(LABELS, PROBS, images, tmp_path)
    assert metrics["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS))
    assert metrics["accuracy_at_0.5"] == 0.75
    assert metrics["accuracy_at_youden"] >= metrics["accuracy_at_0.5"]  # Youden maximises tpr - fpr
    # average precision by hand: positives at ranks 1, 3, 4, 5 -> precisions 1, 2/3, 3/4, 4/5
    assert metrics["average_precision"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    assert {p.name for p in tmp_path.iterdir()} == {
        "roc.png", "pr.png", "confusion.png", "reliability.png", "confident_errors.png",
        "confusion.json", "metrics.json", "roc_curve.csv"}
    assert json.loads((tmp_path / "confusion.json").read_text())["at_0.5"]["fp"] == 1
    text = summary_text(metrics, "evaluation")
    assert "ROC AUC 0.8125" in text and "ECE" in text


def test_one_label_only_is_refused(tmp_path):
    with pytest.raises(ValueError, match="both labels"):
        write_report(np.zeros(4), np.full(4, 0.3), None, tmp_path)


def test_cam_centre_fraction_is_the_heat_share_in_the_centre_of_the_true_positives(tmp_path):
    """The report's cam_centre_fraction: the heat maps of the true positives (label 1, p >= 0.5) only,
    and the share of their heat inside the labelled 32x32 centre."""
    images = np.zeros((8, 96, 96, 3), np.uint8)
    images[LABELS == 1] = 1  # marks the positives, so `explain` can tell which patches it was given
    seen = []

    def centre_heat(patches):  # all heat in the centre for true positives, in a corner otherwise
        seen.append(len(patches))
        heat = np.zeros(patches.shape[:3])
        heat[patches[:, 0, 0, 0] == 1, 40:56, 40:56] = 1
        heat[patches[:, 0, 0, 0] == 0, :8, :8] = 1
        return heat

    metrics = write_report(LABELS, PROBS, images, tmp_path / "a", explain=centre_heat)
    assert metrics["cam_centre_fraction"] == pytest.approx(1.0)
    assert seen[-1] == 3  # the true positives: p = 0.6, 0.7, 0.9 (0.4 is a false negative)

    def corner_heat(patches):
        heat = np.zeros(patches.shape[:3])
        heat[:, :8, :8] = 1
        return heat

    assert write_report(LABELS, PROBS, images, tmp_path / "b", explain=corner_heat)["cam_centre_fraction"] == 0.0
