"""evaluate.py: score any labelled data set with any model reference; the report goes to MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.config.options import between, one_of
from histo_transfer.evaluation.inference import TTA
from histo_transfer.tasks import validation
from histo_transfer.tasks.validation import EnsembleKeys

CONFIG_NAME = "evaluate"
LOADS_TENSORFLOW = True  # tasks.cli imports TensorFlow before main, dropping its load-time banners


@dataclass
class EvaluateKeys:
    model: Any  # any model reference, as predict.py's
    tta: str = one_of(TTA)
    batch_size: int = between(1)
    split: str = one_of(("auto", "all", "val", "test"))
    ensemble: EnsembleKeys


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg, keys=EvaluateKeys)


def main(cfg: DictConfig, context: RunContext | None = None) -> dict[str, float]:
    validate(cfg)
    from histo_transfer.workflows.scoring import evaluate  # TensorFlow: once the config is known to be good

    return evaluate(cfg)
