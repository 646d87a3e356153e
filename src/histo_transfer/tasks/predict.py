"""predict.py: score the test patches with any model reference and write a checked submission.csv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.config.options import between, one_of
from histo_transfer.evaluation.inference import TTA
from histo_transfer.tasks import validation
from histo_transfer.tasks.validation import EnsembleKeys

CONFIG_NAME = "predict"
LOADS_TENSORFLOW = True  # tasks.cli imports TensorFlow before main, dropping its load-time banners


@dataclass
class PredictKeys:
    model: Any  # a reference: run id, models:/NAME@alias, path.keras, a CV or sweep parent, or a list
    tta: str = one_of(TTA)
    batch_size: int = between(1)
    output: str
    ensemble: EnsembleKeys


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg, keys=PredictKeys)


def main(cfg: DictConfig, context: RunContext | None = None) -> Path:
    validate(cfg)
    from histo_transfer.workflows.scoring import predict  # TensorFlow: once the config is known to be good

    return predict(cfg)
