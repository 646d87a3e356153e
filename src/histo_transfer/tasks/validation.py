"""Every task's config, checked once at the entry before any TensorFlow work: a mistake fails in a
second with one line naming the key.

A task's config composes only the groups it uses; `validate` checks those it holds. The choices
(data source, backbone, augmentation, optimizer, strategy, tuner, cv) are checked against their
registries, each option's keys against its Structured Config; the plain groups' keys are here, and a
task's own keys are a dataclass in its module (tasks/<task>.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import histo_transfer.data  # noqa: F401 (registers the data sources)
from histo_transfer import IMAGE_SHAPE
from histo_transfer.config.errors import ConfigError
from histo_transfer.config.objective import ObjectiveKeys
from histo_transfer.config.options import between, check_keys, one_of
from histo_transfer.config.resolvers import RequiredValue
from histo_transfer.data.augment import AUGMENTATIONS
from histo_transfer.data.sources import SOURCES
from histo_transfer.evaluation.inference import COMBINE, TTA
from histo_transfer.models.backbones import BACKBONES
from histo_transfer.training.distribution import STRATEGIES
from histo_transfer.training.optim import OPTIMIZERS
from histo_transfer.workflows.cv_schemes import CV
from histo_transfer.workflows.tuners import TUNERS


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
    swa: int = between(0)
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
    upload_checkpoints: Optional[bool] = None


@dataclass
class DistillKeys:
    teacher: Optional[Any]  # a model reference or a list of them
    tta: str = one_of(TTA)
    top_k: int = between(1)
    method: str = one_of(COMBINE)
    alpha: float = between(0, 1)
    temperature: float = between(0, low_open=True)


@dataclass
class PseudoKeys:
    data: Optional[str]
    teacher: Optional[Any]
    tta: str = one_of(TTA)
    top_k: int = between(1)
    method: str = one_of(COMBINE)
    threshold: float = between(0.5, 1, low_open=True)
    weight: float = between(0, low_open=True)


@dataclass
class EnsembleKeys:
    """How a model reference that stands for several models is combined (predict, evaluate, register)."""

    top_k: int = between(1)
    method: str = one_of(COMBINE)


@dataclass
class SlideKeys:
    """conf/slide/: how a whole-slide image is read, tiled and turned into regions (predict_slide.py)."""

    path: Optional[str]
    mpp: float = between(0, low_open=True)
    mpp_override: Optional[float] = between(0, low_open=True)
    stride: int = between(2, IMAGE_SHAPE[0], high_open=True)  # even: tasks.predict_slide checks it
    min_tissue: float = between(0, 1)
    threshold: float = between(0, 1)
    top_k: int = between(1)
    batch_size: int = between(1)
    workers: int = between(1)


def validate(cfg: DictConfig, *, training: bool = False, keys: type | None = None) -> None:
    """Raise ConfigError naming the first wrong key: the groups `cfg` holds (every training group with
    `training`), then the task's own root-level `keys` (a dataclass), then any required key left out."""
    try:
        if "data" in cfg:
            SOURCES.validate(cfg.data)
        if training:
            _check_training(cfg)
        if "tracking" in cfg:
            check_keys(cfg.tracking, TrackingKeys, "tracking")
            if not cfg.tracking.experiment:
                raise ConfigError("tracking.experiment", "must be a non-empty name")
        if keys is not None:
            check_keys(OmegaConf.masked_copy(cfg, [f.name for f in dataclasses.fields(keys)]), keys, "")
        for key in sorted(OmegaConf.missing_keys(cfg)):
            raise ConfigError(key, f"is required: add {key}=VALUE to the command line")
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        required = _required_value(exc)
        if required is not None:
            raise ConfigError(str(key), f"is required ({required}): add {key}=VALUE to the command line") from None
        raise ConfigError(str(key), str(exc).splitlines()[0]) from exc


def _required_value(exc: BaseException) -> RequiredValue | None:
    """The `${required:...}` behind an OmegaConf error: OmegaConf wraps the resolver's exception more
    than once, as cause or as context."""
    seen = exc
    while seen is not None and not isinstance(seen, RequiredValue):
        seen = seen.__cause__ or seen.__context__
    return seen


def _check_training(cfg: DictConfig) -> None:
    BACKBONES.validate(cfg.backbone)
    AUGMENTATIONS.validate(cfg.augmentation)
    OPTIMIZERS.validate(cfg.optimizer)
    check_keys(cfg.trainer, TrainerKeys, "trainer")
    _check_profile(cfg.trainer.profile_batches)
    check_keys(cfg.head, HeadKeys, "head")
    check_keys(cfg.objective, ObjectiveKeys, "objective")
    check_keys(cfg.distill, DistillKeys, "distill")
    check_keys(cfg.pseudo, PseudoKeys, "pseudo")
    if (cfg.pseudo.data is None) != (cfg.pseudo.teacher is None):
        missing = "pseudo.teacher" if cfg.pseudo.teacher is None else "pseudo.data"
        raise ConfigError(missing, "pseudo-labels need both pseudo.data (holdout or a folder) and pseudo.teacher")
    if cfg.pseudo.data not in (None, "holdout") and not Path(cfg.pseudo.data).expanduser().is_dir():
        raise ConfigError("pseudo.data", f"{cfg.pseudo.data} is neither `holdout` nor a folder")
    for key in ("distill", "pseudo"):
        if cfg[key].teacher is not None and cfg.get("tuner") is not None:
            raise ConfigError(f"{key}.teacher", "a keras-tuner search (tuner=...) takes no teacher; drop one")
    if cfg.get("tuner") is not None:
        TUNERS.validate(cfg.tuner)
    if cfg.get("cv") is not None:
        CV.validate(cfg.cv)
        if cfg.get("tuner") is not None:
            raise ConfigError("cv", "a keras-tuner search (tuner=...) cannot also be cross-validated; drop one")


def _check_profile(batches) -> None:
    if batches is not None and (len(batches) != 2 or not 1 <= batches[0] <= batches[1]):
        raise ConfigError("trainer.profile_batches", f"{list(batches)} is not [first, last] with 1 <= first <= last")
