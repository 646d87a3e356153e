"""EDA: label distribution, sample grid and colour statistics as an MLflow run of its own."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import compose_config, store_overrides, write_kaggle_layout
from mlflow.tracking import MlflowClient

from histo_transfer.data.images import read_patches
from histo_transfer.data.kaggle import read_labelled
from histo_transfer.workflows.eda import eda


def test_eda_logs_distribution_grid_and_colour_statistics(tmp_path):
    root = tmp_path / "data"
    write_kaggle_layout(root, [0, 0, 0, 1, 1] * 12)
    cfg = compose_config(["data=kaggle", f"data.root={root}", *store_overrides(tmp_path)])
    run_id = eda(cfg)
    run = MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "eda"
    metrics = run.data.metrics
    assert (metrics["n_label_0"], metrics["n_label_1"]) == (36, 24)
    assert metrics["positive_fraction"] == pytest.approx(0.4)
    names = {a.path for a in MlflowClient(cfg.tracking.uri).list_artifacts(run_id, "eda")}
    assert {"eda/label_distribution.png", "eda/sample_patches.png", "eda/class_colour_stats.csv",
            "eda/class_colour_histograms.png", "eda/label_counts.csv"} <= names
    stats = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/eda/class_colour_stats.csv"))
    listing = read_labelled(root)
    images = read_patches(listing.paths()).astype(np.float64)
    expected = images[listing.labels == 1][..., 2].mean()
    assert stats.query("label == 1 and channel == 'blue'")["mean"].item() == pytest.approx(expected, rel=1e-4)
    assert metrics["label_1_blue_mean"] == pytest.approx(expected, rel=1e-4)
