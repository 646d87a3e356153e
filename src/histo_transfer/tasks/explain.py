"""scripts/explain.py: where one model looks (Grad-CAM) on chosen patches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.tasks import validation

CONFIG_NAME = "explain"
LOADS_TENSORFLOW = True  # tasks.cli imports TensorFlow before main, dropping its load-time banners


@dataclass
class ExplainKeys:
    model: Any  # one model's reference
    ids: List[Any]  # patch ids of the data set
    output: str


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg, keys=ExplainKeys)


def main(cfg: DictConfig, context: RunContext | None = None) -> Path:
    validate(cfg)
    from histo_transfer.workflows.scoring import explain  # TensorFlow: once the config is known to be good

    return explain(cfg)
