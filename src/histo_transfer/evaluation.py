"""Figures and scores of a trained classifier (no MLflow here: callers log what this returns)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402


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


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, path: Path, title: str = "Validation ROC") -> float:
    """Writes the ROC curve to `path`; returns the exact ROC AUC."""
    auc = roc_auc_score(labels, probabilities)
    fpr, tpr, _ = roc_curve(labels, probabilities)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return float(auc)
