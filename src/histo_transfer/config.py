"""Checks a composed config before any TensorFlow work, so mistakes fail in a second with one line."""

from __future__ import annotations

from numbers import Integral, Real
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from histo_transfer.data import pcam_h5
from histo_transfer.data.layout import check_layout
from histo_transfer.errors import ConfigError
from histo_transfer.models.backbones import BACKBONES

DATA_SOURCES = ("synthetic", "kaggle", "pcam_h5")
BAD_IMAGE_POLICIES = ("error", "skip")
AUGMENTATIONS = ("none", "basic", "notebook", "strong")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "plateau")
TUNERS = ("random", "hyperband", "bayesian")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first wrong key and how to fix it."""
    try:
        _check_data(cfg.data)
        _check_backbone(cfg.backbone)
        _check_augmentation(cfg.augmentation)
        _check_optimizer(cfg.optimizer)
        _check_trainer(cfg.trainer)
        _number(cfg.head, "head.dropout", low=0, high=1, high_open=True)
        _integer(cfg.head, "head.units", low=1)
        _number(cfg.head, "head.bn_momentum", low=0, high=1, high_open=True)
        if cfg.get("tuner") is not None:
            _check_tuner(cfg.tuner)
        if not isinstance(cfg.tracking.experiment, str) or not cfg.tracking.experiment:
            raise ConfigError("tracking.experiment", "must be a non-empty name")
        for key in sorted(OmegaConf.missing_keys(cfg)):
            raise ConfigError(key, f"is required: add {key}=VALUE to the command line")
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(key), str(exc).splitlines()[0]) from exc


def _check_data(data) -> None:
    _choice(data.name, "data", DATA_SOURCES)
    _number(data, "data.frac", low=0, high=1, low_open=True)
    _number(data, "data.val_split", low=0, high=1, low_open=True, high_open=True)
    _integer(data, "data.seed")
    if data.workers is not None:
        _integer(data, "data.workers", low=1)
    if data.on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError("data.on_bad_image", f"{data.on_bad_image!r} is not one of {', '.join(BAD_IMAGE_POLICIES)}")
    if data.name == "synthetic":
        _integer(data, "data.n_train", low=20)
        _integer(data, "data.n_test", low=0)
        return
    if OmegaConf.is_missing(data, "root") or data.root in (None, ""):
        holds = "train/ and train_labels.csv" if data.name == "kaggle" else "the camelyonpatch_level_2_split_*.h5 files"
        raise ConfigError("data.root", f"data={data.name} needs data.root=PATH, the folder holding {holds}")
    root = Path(data.root).expanduser()
    if data.name == "kaggle":
        check_layout(root)
    else:
        pcam_h5.check_layout(root)


def _check_backbone(backbone) -> None:
    _choice(backbone.name, "backbone", BACKBONES)
    spec = BACKBONES[backbone.name]
    _number(backbone, "backbone.fine_tune_fraction", low=0, high=1)
    _integer(backbone, "backbone.input_size", low=spec.min_input_size)
    if spec.alphas and backbone.alpha not in spec.alphas:
        raise ConfigError("backbone.alpha", f"{backbone.alpha} is not one of {', '.join(map(str, spec.alphas))}")
    if not spec.application:
        _integer(backbone, "backbone.width", low=1)
    weights = backbone.weights
    if weights is None or weights in ("auto", "imagenet"):
        if weights is not None and not spec.pretrained:
            raise ConfigError("backbone.weights", f"{backbone.name} has no pretrained weights; use backbone.weights=null")
        return
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise ConfigError("backbone.weights", f"{weights!r} is neither auto, imagenet, null nor an existing weights file")
    if not path.name.endswith(".h5"):
        raise ConfigError("backbone.weights", f"{path} is not a Keras .h5 weights file")


def _check_augmentation(augmentation) -> None:
    _choice(augmentation.name, "augmentation", AUGMENTATIONS)
    if augmentation.name == "notebook":
        _number(augmentation, "augmentation.rotation_degrees", low=0, high=180)
        _number(augmentation, "augmentation.shift", low=0, high=1, high_open=True)
        _number(augmentation, "augmentation.zoom", low=0, high=1, high_open=True)
    if augmentation.name == "strong":
        for key in ("stain_sigma", "brightness", "contrast"):
            _number(augmentation, f"augmentation.{key}", low=0, high=1)


def _check_optimizer(optimizer) -> None:
    _choice(optimizer.name, "optimizer", OPTIMIZERS)
    _number(optimizer, "optimizer.lr", low=0, low_open=True)
    if optimizer.schedule not in SCHEDULES:
        raise ConfigError("optimizer.schedule", f"{optimizer.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if optimizer.name == "adamw":
        _number(optimizer, "optimizer.weight_decay", low=0)
    if optimizer.name == "sgd":
        _number(optimizer, "optimizer.momentum", low=0, high=1, high_open=True)


def _check_trainer(trainer) -> None:
    _integer(trainer, "trainer.epochs", low=0)
    _integer(trainer, "trainer.batch_size", low=1)
    _number(trainer, "trainer.label_smoothing", low=0, high=1, high_open=True)
    _integer(trainer, "trainer.early_stopping_patience", low=0)
    _integer(trainer, "trainer.seed")
    if trainer.strategy not in STRATEGIES:
        raise ConfigError("trainer.strategy", f"{trainer.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if trainer.logical_cpu_devices is not None:
        _integer(trainer, "trainer.logical_cpu_devices", low=1)
    for key in ("mixed_precision", "resume"):
        if not isinstance(trainer[key], bool):
            raise ConfigError(f"trainer.{key}", "must be true or false")


def _check_tuner(tuner) -> None:
    _choice(tuner.name, "tuner", TUNERS)
    _integer(tuner, "tuner.epochs", low=1)
    _integer(tuner, "tuner.max_trials", low=1)
    for key, bounds in tuner.search_space.items():
        if bounds is None:
            continue
        if key not in ("lr", "dropout"):
            raise ConfigError(f"tuner.search_space.{key}", "only lr and dropout can be searched")
        _number(bounds, f"tuner.search_space.{key}.min", low=0, low_open=key == "lr")
        _number(bounds, f"tuner.search_space.{key}.max", low=bounds.min, low_open=True,
                high=1 if key == "dropout" else None, high_open=True)


def _choice(value, group: str, options) -> None:
    if value not in options:
        raise ConfigError(group, f"{value!r} is not an option; choose one of {', '.join(options)}")


def _value(node, dotted: str):
    return node[dotted.rsplit(".", 1)[-1]]


def _number(node, dotted, low=None, high=None, low_open=False, high_open=False) -> None:
    value = _value(node, dotted)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(dotted, f"must be a number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ConfigError(dotted, f"{value} is out of range; need {lo}{dotted.rsplit('.', 1)[-1]}{hi}")


def _integer(node, dotted, low=None) -> None:
    value = _value(node, dotted)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(dotted, f"must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(dotted, f"{value} is too small; need at least {low}")
