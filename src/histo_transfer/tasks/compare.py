"""scripts/compare_cv.py: recipes compared out of sample, on their CVs' out-of-fold predictions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.tasks import validation
from histo_transfer.workflows.comparison import compare_from_config

CONFIG_NAME = "compare"


@dataclass
class CompareKeys:
    runs: Any  # CV parent run ids (or a sweep of CVs), the baseline first


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg, keys=CompareKeys)


def main(cfg: DictConfig, context: RunContext | None = None):
    validate(cfg)
    return compare_from_config(cfg)
