"""scripts/register.py: a training run's model, or any model reference exported as one model, into
MLflow's model registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.config.errors import ConfigError
from histo_transfer.config.options import between, one_of
from histo_transfer.evaluation.inference import TTA
from histo_transfer.tasks import validation

CONFIG_NAME = "register"
LOADS_TENSORFLOW = True  # tasks.cli imports TensorFlow before main, dropping its load-time banners


@dataclass
class ExportKeys:
    tta: str = one_of(TTA)  # views averaged inside the exported model


@dataclass
class MembersKeys:
    top_k: int = between(1)


@dataclass
class RegisterKeys:
    run: Optional[str]  # a training run, registered as it is
    model: Any  # or any model reference, exported first
    name: str
    alias: Optional[str]
    export: ExportKeys
    ensemble: MembersKeys


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg, keys=RegisterKeys)
    if (cfg.run is None) == (cfg.model is None):
        raise ConfigError("run", "give exactly one of run=<training run id> and model=<any model reference>")


def main(cfg: DictConfig, context: RunContext | None = None) -> str:
    validate(cfg)
    from histo_transfer.workflows.export import register_from_config  # TensorFlow: once the config is good

    return register_from_config(cfg)
