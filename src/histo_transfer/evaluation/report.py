"""Scores and figures of a classifier on labelled patches (no MLflow here: callers log what this writes).

`write_report` writes every figure and table into a folder and returns the scalar metrics; training
runs (on their validation split) and evaluate.py (on any labelled folder) both use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from histo_transfer.data.images import patch_grid  # noqa: E402
from histo_transfer.evaluation.gradcam import centre_fraction, overlaid  # noqa: E402

CALIBRATION_BINS = 10
BOOTSTRAP_SAMPLES = 1000
ERROR_GRID = 8  # most confident false positives / negatives shown
CAM_SAMPLE = 64  # true positives whose heat maps give cam_centre_fraction


def write_report(labels: np.ndarray, probabilities: np.ndarray, images, out: Path, seed: int = 0,
                 ids=None, explain=None) -> dict[str, float]:
    """ROC/PR curves, AUC with bootstrap 95 % CI, threshold metrics at 0.5 and Youden's J,
    confusion matrices, calibration (reliability diagram, ECE, Brier) and the most confident errors;
    with `ids`, also every patch's prediction (predictions.csv: id,label,probability); with
    `explain` (patches -> heat maps, e.g. Grad-CAM), heat maps over the errors and
    `cam_centre_fraction`, the share of heat in the labelled centre on true positives."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {"n": float(len(labels)), "positive_fraction": float(labels.mean())}
    if len(set(labels.tolist())) < 2:
        raise ValueError("evaluation needs patches of both labels")

    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    metrics["auc"] = float(roc_auc_score(labels, probabilities))
    metrics["auc_ci_low"], metrics["auc_ci_high"] = bootstrap_auc_ci(labels, probabilities, seed)
    precision, recall, _ = precision_recall_curve(labels, probabilities)
    # average precision, not the trapezoidal area under the PR curve (which overestimates it)
    metrics["average_precision"] = float(average_precision_score(labels, probabilities))
    youden = float(thresholds[np.argmax(tpr - fpr)])
    metrics["youden_threshold"] = min(youden, 1.0)
    confusion = {}
    for name, threshold in (("at_0.5", 0.5), ("at_youden", metrics["youden_threshold"])):
        scores, matrix = threshold_metrics(labels, probabilities, threshold)
        metrics.update({f"{k}_{name}": v for k, v in scores.items()})
        confusion[name] = {"threshold": threshold, **matrix}
    metrics["ece"], metrics["brier"], reliability = calibration(labels, probabilities)

    if ids is not None:
        import pandas as pd

        pd.DataFrame({"id": np.asarray(ids, dtype=str), "label": labels, "probability": probabilities}).to_csv(
            out / "predictions.csv", index=False)
    (out / "confusion.json").write_text(json.dumps(confusion, indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    np.savetxt(out / "roc_curve.csv", np.column_stack([fpr, tpr, thresholds]), delimiter=",",
               header="fpr,tpr,threshold", comments="")
    _plot_roc(fpr, tpr, metrics, out / "roc.png")
    _plot_pr(recall, precision, metrics, out / "pr.png")
    _plot_confusion(confusion["at_0.5"], out / "confusion.png")
    _plot_reliability(reliability, metrics, out / "reliability.png")
    if images is not None:
        _plot_errors(labels, probabilities, images, out / "confident_errors.png", explain)
    if images is not None and explain is not None:
        hits = np.flatnonzero((labels == 1) & (probabilities >= 0.5))
        hits = np.sort(np.random.default_rng(seed).permutation(hits)[:CAM_SAMPLE])
        metrics["cam_centre_fraction"] = centre_fraction(explain(images[hits])) if len(hits) else float("nan")
    return metrics


def bootstrap_auc_ci(labels, probabilities, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Percentile 95 % interval of the ROC AUC over patches resampled with replacement."""
    (values,) = resampled_aucs(labels, [probabilities], seed, samples)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def paired_auc_difference(labels, baseline, candidate, seed: int = 0,
                          samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float, float, float]:
    """AUC(candidate) - AUC(baseline) on the same patches: the difference, its percentile 95 % interval
    and the share of resamples in which the candidate is ahead. Both are scored on every resample, so
    what they share (which patches are hard) cancels: far tighter than two separate intervals."""
    base, cand = resampled_aucs(labels, [baseline, candidate], seed, samples)
    differences = cand - base
    low, high = np.percentile(differences, [2.5, 97.5])
    observed = roc_auc_score(labels, candidate) - roc_auc_score(labels, baseline)
    return float(observed), float(low), float(high), float(np.mean(differences > 0))


def resampled_aucs(labels, scores: list, seed: int, samples: int, cells: int = 2_000_000) -> list[np.ndarray]:
    """The ROC AUC of each score array on the same `samples` resamples of the patches (drawn with
    replacement; draws holding one class only are skipped). A resample is a count per patch, and the
    AUC of counted patches is the Mann-Whitney statistic with those counts as weights: one sort per
    score array and a few array sums per chunk of resamples, not a thousand roc_auc_score calls
    (seconds per run, the larger part of a short training run's evaluation). Chunks hold about
    `cells` counts, so memory stays a few arrays of that size whatever the number of patches."""
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    rng = np.random.default_rng(seed)
    ranked = [_TiedRanks(labels, np.asarray(score, dtype=np.float64)) for score in scores]
    chunk = max(1, min(samples, cells // max(n, 1)))
    aucs: list[list[np.ndarray]] = [[] for _ in scores]
    for start in range(0, samples, chunk):
        rows = min(chunk, samples - start)
        picks = rng.integers(0, n, (rows, n))
        weights = np.bincount((picks + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n)
        positives = weights @ labels
        weights = weights[(positives > 0) & (positives < n)].astype(np.float64)
        for found, ranks in zip(aucs, ranked):
            found.append(ranks.weighted_aucs(weights))
    return [np.concatenate(found) for found in aucs]


class _TiedRanks:
    """One score array sorted once: its order, its groups of tied scores and which patches are positive."""

    def __init__(self, labels: np.ndarray, score: np.ndarray):
        self.order = np.argsort(score, kind="stable")
        ordered = score[self.order]
        self.starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        self.positive = labels[self.order] == 1

    def weighted_aucs(self, weights: np.ndarray) -> np.ndarray:
        """Per row of `weights`: P(score of a positive > score of a negative), ties counted as one half."""
        weights = weights[:, self.order]
        pos = np.add.reduceat(np.where(self.positive, weights, 0.0), self.starts, axis=1)
        neg = np.add.reduceat(np.where(self.positive, 0.0, weights), self.starts, axis=1)
        negatives_below = np.cumsum(neg, axis=1) - neg
        wins = (pos * (negatives_below + 0.5 * neg)).sum(axis=1)
        return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def threshold_metrics(labels, probabilities, threshold: float) -> tuple[dict[str, float], dict[str, int]]:
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, probabilities >= threshold, labels=[0, 1]).ravel())
    scores = {"accuracy": (tp + tn) / len(labels), "sensitivity": tp / max(tp + fn, 1),
              "specificity": tn / max(tn + fp, 1)}
    return scores, {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def calibration(labels, probabilities, bins: int = CALIBRATION_BINS):
    """Expected calibration error over equal-width bins, Brier score, and the reliability table
    (bin centre, patches, mean predicted probability, observed share of label 1) of non-empty bins."""
    observed, predicted = calibration_curve(labels, probabilities, n_bins=bins, strategy="uniform")
    # the bins calibration_curve reports (the non-empty ones, in order), binned as it bins them
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], probabilities), minlength=bins)
    centres = (np.flatnonzero(counts) + 0.5) / bins
    counts = counts[counts > 0]
    ece = float(np.sum(counts / len(labels) * np.abs(predicted - observed)))
    table = [(float(c), int(n), float(p), float(o)) for c, n, p, o in zip(centres, counts, predicted, observed)]
    return ece, float(brier_score_loss(labels, probabilities)), table


def plot_training_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Accuracy, loss and AUC per epoch, training vs validation, as the notebook plots them."""
    names = [name for name in ("accuracy", "loss", "auc") if name in history]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 3.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], marker="o", label="Training")
        ax.plot(epochs, history.get(f"val_{name}", []), marker="o", label="Validation")
        ax.set_title(f"Training / validation {name}")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_text(metrics: dict[str, float], title: str) -> str:
    """The one-screen summary printed by evaluate.py."""
    m = metrics
    return "\n".join([
        title,
        f"  patches {int(m['n'])}, positive fraction {m['positive_fraction']:.3f}",
        f"  ROC AUC {m['auc']:.4f}  (95 % CI {m['auc_ci_low']:.4f} - {m['auc_ci_high']:.4f}),"
        f"  average precision {m['average_precision']:.4f}",
        f"  at 0.5:              accuracy {m['accuracy_at_0.5']:.4f}  sensitivity {m['sensitivity_at_0.5']:.4f}"
        f"  specificity {m['specificity_at_0.5']:.4f}",
        f"  at Youden {m['youden_threshold']:.3f}:  accuracy {m['accuracy_at_youden']:.4f}"
        f"  sensitivity {m['sensitivity_at_youden']:.4f}  specificity {m['specificity_at_youden']:.4f}",
        f"  calibration: ECE {m['ece']:.4f}, Brier {m['brier']:.4f}",
    ])


def _plot_roc(fpr, tpr, metrics, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {metrics['auc']:.4f} [{metrics['auc_ci_low']:.3f}, {metrics['auc_ci_high']:.3f}]")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_pr(recall, precision, metrics, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label=f"average precision = {metrics['average_precision']:.4f}")
    ax.axhline(metrics["positive_fraction"], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    _save(fig, path)


def _plot_confusion(matrix: dict, path: Path) -> None:
    cells = np.array([[matrix["tn"], matrix["fp"]], [matrix["fn"], matrix["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cells, cmap="Blues")
    for (row, column), count in np.ndenumerate(cells):
        ax.text(column, row, str(count), ha="center", va="center", fontsize=12)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["0", "1"], yticklabels=["0", "1"],
           xlabel="predicted", ylabel="true", title=f"Confusion at {matrix['threshold']:.2f}")
    _save(fig, path)


def _plot_reliability(table, metrics, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar([centre for centre, *_ in table], [observed for *_, observed in table], width=1 / CALIBRATION_BINS,
           edgecolor="black",
           alpha=0.6, label="observed share of label 1")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set(xlabel="predicted probability", ylabel="observed frequency",
           title=f"Reliability (ECE {metrics['ece']:.3f}, Brier {metrics['brier']:.3f})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    _save(fig, path)


def _plot_errors(labels, probabilities, images, path: Path, explain=None) -> None:
    """The most confident false positives (top row) and false negatives (bottom row), with where the
    model looked (Grad-CAM) when `explain` is given; the centre 32x32 region that defines the label is outlined."""
    false_pos = np.flatnonzero((labels == 0) & (probabilities >= 0.5))
    false_neg = np.flatnonzero((labels == 1) & (probabilities < 0.5))
    false_pos = false_pos[np.argsort(-probabilities[false_pos])][:ERROR_GRID]
    false_neg = false_neg[np.argsort(probabilities[false_neg])][:ERROR_GRID]
    rows, captions = [], []
    for picked, kind in ((false_pos, "label 0"), (false_neg, "label 1")):
        patches = np.asarray([images[i] for i in picked])
        heat = explain(patches) if explain is not None and len(picked) else [None] * len(picked)
        rows.append([overlaid(patch, map_) for patch, map_ in zip(patches, heat)])
        captions.append([f"{kind}, p={probabilities[i]:.2f}" for i in picked])
    size, gap = images[0].shape[0], 24  # room for each patch's caption
    fig, ax = plt.subplots(figsize=(2 * ERROR_GRID, 4.6))
    if any(rows):
        ax.imshow(patch_grid([row or [np.full_like(images[0], 255)] for row in rows], gap))
        for r, row in enumerate(captions):
            for c, caption in enumerate(row):
                ax.text(c * (size + gap) + size / 2, r * (size + gap) - 3, caption, ha="center", va="bottom", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    ax.axis("off")
    heat_note = "; heat: Grad-CAM" if explain is not None else ""
    fig.suptitle(f"Most confident errors: false positives (top), false negatives (bottom){heat_note}")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
