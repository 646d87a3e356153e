"""Real data: a short run on the 2,000 real Kaggle patches with real ImageNet weights."""

from __future__ import annotations

import pytest
from conftest import MOBILENET_V1_WEIGHTS, PCAM_SAMPLE, compose_config, store_overrides
from mlflow.tracking import MlflowClient

from histo_transfer.tasks.train import main as train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PCAM_SAMPLE.is_dir() and MOBILENET_V1_WEIGHTS.is_file()),
                       reason="needs ../shared/data/pcam_sample and ../shared/weights/mobilenet_2_5_224_tf_no_top.h5 "
                              "beside the checkout (absent in a fresh clone)"),
]


def test_short_run_on_the_real_sample_reaches_val_auc_085(tmp_path):
    cfg = compose_config([
        "data=kaggle", f"data.root={PCAM_SAMPLE}", "backbone=mobilenet_v1", f"backbone.weights={MOBILENET_V1_WEIGHTS}",
        "backbone.input_size=128", "trainer.epochs=4", "trainer.early_stopping_patience=0", "head.bn_momentum=0.9",
        *store_overrides(tmp_path)])
    best = train(cfg)
    [run] = MlflowClient(cfg.tracking.uri).search_runs(["1"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["weights_source"] == f"file:{MOBILENET_V1_WEIGHTS.resolve()}"
    assert run.data.metrics["n_train"] == 1600 and run.data.metrics["n_val"] == 400
    assert best >= 0.85
