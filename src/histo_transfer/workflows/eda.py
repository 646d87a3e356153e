"""Exploratory look at a labelled data set, logged to MLflow as its own run (`scripts/eda.py`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: EDA renders files, never a window
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from histo_transfer.data.sources import data_source  # noqa: E402
from histo_transfer.tracking import runs as tracking  # noqa: E402
from histo_transfer.tracking.schema import DATA_ROOT_TAG, DATA_TAG, DATASET_FINGERPRINT_TAG, EDA_DIR, KIND_TAG, RunKind  # noqa: E402

log = logging.getLogger(__name__)

GRID_COLUMNS, GRID_ROWS = 10, 5  # the notebook's sample grid
MAX_STATS_PATCHES = 20_000  # colour statistics from a seeded sample: enough for 3 decimals
CHANNELS = ("red", "green", "blue")


def eda(cfg: DictConfig, context=None) -> str:
    """Label distribution, a grid of sample patches and per-class colour statistics; returns the run id."""
    experiment_id = tracking.setup(cfg.tracking)
    tags = {KIND_TAG: RunKind.EDA.value, DATA_TAG: cfg.data.name}
    with tracking.tracked_run(experiment_id, f"eda {cfg.data.name}", tags) as run, tempfile.TemporaryDirectory() as tmp:
        labelled = data_source(cfg.data).labelled()
        root, key, patches, unlisted = labelled.root, labelled.fingerprint, labelled.patches, labelled.unlisted
        usable = patches.usable(cfg.data.on_bad_image)
        mlflow.set_tags({DATASET_FINGERPRINT_TAG: key, DATA_ROOT_TAG: str(root)})
        labels = patches.labels[usable]
        counts = {label: int((labels == label).sum()) for label in (0, 1)}
        positive = counts[1] / max(len(labels), 1)
        mlflow.log_metrics({"n_patches": len(labels), "n_label_0": counts[0], "n_label_1": counts[1],
                            "positive_fraction": positive, "n_bad_images": len(patches.bad),
                            "n_unlisted_files": len(unlisted)})
        out = Path(tmp)
        rng = np.random.default_rng(cfg.data.seed)
        stats = colour_statistics(patches.images, labels, usable, rng)
        stats.to_csv(out / "class_colour_stats.csv", index=False)
        for row in stats.itertuples():
            mlflow.log_metrics({f"label_{row.label}_{row.channel}_mean": row.mean,
                                f"label_{row.label}_{row.channel}_std": row.std})
        pd.DataFrame({"label": [0, 1], "count": [counts[0], counts[1]]}).to_csv(out / "label_counts.csv", index=False)
        plot_label_distribution(counts, out / "label_distribution.png")
        shown = rng.choice(usable, size=min(GRID_COLUMNS * GRID_ROWS, len(usable)), replace=False)
        plot_sample_grid(patches.images[np.sort(shown)], patches.labels[np.sort(shown)], out / "sample_patches.png")
        plot_colour_histograms(patches.images, labels, usable, rng, out / "class_colour_histograms.png")
        mlflow.log_artifacts(str(out), EDA_DIR)
        print(f"{root}: {len(labels)} patches, label 0: {counts[0]}, label 1: {counts[1]} "
              f"(positive fraction {positive:.3f}); MLflow run {run.info.run_id}")
        return run.info.run_id


def _stats_sample(labels, usable, rng) -> np.ndarray:
    """Positions (into `usable`) of a seeded sample, sorted for sequential reads of the memory map."""
    count = min(MAX_STATS_PATCHES, len(usable))
    return np.sort(rng.choice(len(usable), size=count, replace=False))


def colour_statistics(images, labels, usable, rng):
    """Mean and standard deviation of each RGB channel per class (0-255)."""
    import pandas as pd

    chosen = _stats_sample(labels, usable, rng)
    pixels = images[usable[chosen]].astype(np.float32)
    rows = []
    for label in (0, 1):
        of_class = pixels[labels[chosen] == label]
        if len(of_class) == 0:
            continue
        for channel, name in enumerate(CHANNELS):
            values = of_class[..., channel]
            rows.append({"label": label, "channel": name, "mean": float(values.mean()), "std": float(values.std())})
    return pd.DataFrame(rows)


def plot_label_distribution(counts: dict[int, int], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    bars = ax.bar(["0 (no tumour)", "1 (tumour)"], [counts[0], counts[1]], color=["#7a9cc6", "#c66b7a"])
    ax.bar_label(bars)
    ax.set(title="Label distribution", ylabel="patches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sample_grid(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """The notebook's 10 x 5 grid of patches, each titled with its label."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(GRID_ROWS, GRID_COLUMNS, figsize=(15, 8))
    for ax, index in zip(axes.flat, range(GRID_ROWS * GRID_COLUMNS)):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index])
            ax.set_title(str(labels[index]))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_colour_histograms(images, labels, usable, rng, path: Path) -> None:
    import matplotlib.pyplot as plt

    chosen = _stats_sample(labels, usable, rng)[:2000]
    pixels = images[usable[chosen]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    for channel, (ax, name) in enumerate(zip(axes, CHANNELS)):
        for label, colour in ((0, "#7a9cc6"), (1, "#c66b7a")):
            values = pixels[labels[chosen] == label][..., channel].ravel()
            ax.hist(values, bins=64, range=(0, 255), density=True, alpha=0.6, color=colour, label=f"label {label}")
        ax.set(title=f"{name} channel", xlabel="intensity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
