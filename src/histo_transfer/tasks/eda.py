"""scripts/eda.py: an exploratory look at a labelled data set, as its own MLflow run."""

from __future__ import annotations

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.tasks import validation
from histo_transfer.workflows.eda import eda

CONFIG_NAME = "eda"


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg)


def main(cfg: DictConfig, context: RunContext | None = None) -> str:
    validate(cfg)
    return eda(cfg)
