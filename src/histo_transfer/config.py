"""Checks a composed config before any TensorFlow work, so mistakes fail in a second with one line.

The choices (data source, backbone, augmentation, optimizer, strategy, tuner) are checked against
their registries, each option's keys against its Structured Config; the plain groups' keys are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import histo_transfer.data  # noqa: F401 (registers the data sources)
from histo_transfer.augment import AUGMENTATIONS
from histo_transfer.cross_validation import CV
from histo_transfer.data.sources import SOURCES
from histo_transfer.distribution import STRATEGIES
from histo_transfer.errors import ConfigError
from histo_transfer.models.backbones import BACKBONES
from histo_transfer.objective import ObjectiveKeys
from histo_transfer.optim import OPTIMIZERS
from histo_transfer.options import between, check_keys, one_of
from histo_transfer.tuning import TUNERS


@dataclass
class TrainerKeys:
    epochs: int = between(0)
    batch_size: int = between(1)
    mixed_precision: bool
    label_smoothing: float = between(0, 1, high_open=True)
    early_stopping_patience: int = between(0)
    seed: int
    resume: bool
    checkpoint_dir: str
    strategy: str = one_of(STRATEGIES)
    logical_cpu_devices: Optional[int] = between(1)
    steps_per_epoch: Optional[int] = between(1)
    overfit_batches: int = between(0)
    bn_recalibration_batches: int = between(0)
    profile_batches: Optional[List[int]]
    progress: str = one_of(("auto", "bar", "epoch", "none"))


@dataclass
class HeadKeys:
    dropout: float = between(0, 1, high_open=True)
    units: int = between(1)
    bn_momentum: float = between(0, 1, high_open=True)


@dataclass
class TrackingKeys:
    uri: str
    experiment: str
    run_name: Optional[str]
    tags: Dict[str, Any]
    register_best: Optional[str]
    system_metrics: bool
    system_metrics_interval: float = between(0, low_open=True)
    outage_limit_s: float = between(0)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first wrong key and how to fix it."""
    try:
        SOURCES.validate(cfg.data)
        BACKBONES.validate(cfg.backbone)
        AUGMENTATIONS.validate(cfg.augmentation)
        OPTIMIZERS.validate(cfg.optimizer)
        check_keys(cfg.trainer, TrainerKeys, "trainer")
        _check_profile(cfg.trainer.profile_batches)
        check_keys(cfg.head, HeadKeys, "head")
        check_keys(cfg.objective, ObjectiveKeys, "objective")
        check_keys(cfg.tracking, TrackingKeys, "tracking")
        if not cfg.tracking.experiment:
            raise ConfigError("tracking.experiment", "must be a non-empty name")
        if cfg.get("tuner") is not None:
            TUNERS.validate(cfg.tuner)
        if cfg.get("cv") is not None:
            CV.validate(cfg.cv)
            if cfg.get("tuner") is not None:
                raise ConfigError("cv", "a keras-tuner search (tuner=...) cannot also be cross-validated; drop one")
        for key in sorted(OmegaConf.missing_keys(cfg)):
            raise ConfigError(key, f"is required: add {key}=VALUE to the command line")
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(key), str(exc).splitlines()[0]) from exc


def _check_profile(batches) -> None:
    if batches is not None and (len(batches) != 2 or not 1 <= batches[0] <= batches[1]):
        raise ConfigError("trainer.profile_batches", f"{list(batches)} is not [first, last] with 1 <= first <= last")
