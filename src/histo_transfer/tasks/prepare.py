"""scripts/prepare_data.py: check a data set and build its packed cache ahead of training."""

from __future__ import annotations

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.data.loading import prepare
from histo_transfer.tasks import validation

CONFIG_NAME = "prepare"


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg)


def main(cfg: DictConfig, context: RunContext | None = None) -> None:
    validate(cfg)
    prepare(cfg)
