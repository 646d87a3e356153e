"""Backbones (config group `backbone`): name -> Keras application, its preprocess_input, and limits.

Pure data at import time so config validation can check names without loading TensorFlow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from histo_transfer.config.errors import ConfigError
from histo_transfer.config.options import Options, between

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    application: str  # class in keras.applications, or "" for tiny_cnn
    preprocess_module: str  # keras.applications.<module>.preprocess_input
    min_input_size: int = 32
    alphas: tuple[float, ...] = ()  # width multipliers Keras publishes weights for
    pretrained: bool = True  # ImageNet weights exist


@dataclass
class BackboneKeys:
    name: str
    weights: Optional[str]  # auto | imagenet | null | path to .h5
    fine_tune_fraction: float = between(0, 1)
    input_size: int = between(1)


@dataclass
class WidthMultiplierKeys(BackboneKeys):
    alpha: float


@dataclass
class TinyCnnKeys(BackboneKeys):
    width: int = between(1)


def _check(node, spec: BackboneSpec) -> None:
    if node.input_size < spec.min_input_size:
        raise ConfigError("backbone.input_size", f"{node.input_size} is too small; need at least {spec.min_input_size}")
    if spec.alphas and node.alpha not in spec.alphas:
        raise ConfigError("backbone.alpha", f"{node.alpha} is not one of {', '.join(map(str, spec.alphas))}")
    weights = node.weights
    if weights is None or weights in ("auto", "imagenet"):
        if weights is not None and not spec.pretrained:
            raise ConfigError("backbone.weights", f"{node.name} has no pretrained weights; use backbone.weights=null")
        return
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise ConfigError("backbone.weights", f"{weights!r} is neither auto, imagenet, null nor an existing weights file")
    if not path.name.endswith(".h5"):
        raise ConfigError("backbone.weights", f"{path} is not a Keras .h5 weights file")


BACKBONES = Options("backbone", check=_check)
BACKBONES.add("mobilenetv2", BackboneSpec("MobileNetV2", "mobilenet_v2", alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4)),
              WidthMultiplierKeys)
BACKBONES.add("resnet152v2", BackboneSpec("ResNet152V2", "resnet_v2"), BackboneKeys)
BACKBONES.add("inceptionresnetv2", BackboneSpec("InceptionResNetV2", "inception_resnet_v2", min_input_size=75),
              BackboneKeys)
BACKBONES.add("densenet201", BackboneSpec("DenseNet201", "densenet"), BackboneKeys)
BACKBONES.add("efficientnetb2", BackboneSpec("EfficientNetB2", "efficientnet"), BackboneKeys)
BACKBONES.add("mobilenet_v1", BackboneSpec("MobileNet", "mobilenet", alphas=(0.25, 0.5, 0.75, 1.0)),
              WidthMultiplierKeys)
# Scales to [-1, 1] like the MobileNets.
BACKBONES.add("tiny_cnn", BackboneSpec("", "mobilenet_v2", pretrained=False), TinyCnnKeys)


@dataclass
class Backbone:
    model: object  # keras.Model
    preprocess_input: object  # callable on symbolic tensors
    weights_source: str  # recorded as the run tag `weights_source`

    @property
    def pretrained(self) -> bool:
        return not self.weights_source.startswith("random")


def build_backbone(cfg, input_size: int) -> Backbone:
    """Instantiate the backbone named by `cfg.name` (without its top) and load its weights."""
    import keras

    spec = BACKBONES[cfg.name]
    preprocess = getattr(keras.applications, spec.preprocess_module).preprocess_input
    shape = (input_size, input_size, 3)
    if not spec.application:
        return Backbone(_tiny_cnn(shape, cfg.width), preprocess, "random")

    application = getattr(keras.applications, spec.application)
    kwargs = {"input_shape": shape, "include_top": False}
    if spec.alphas:
        kwargs["alpha"] = cfg.alpha

    weights = cfg.weights
    if weights is None:
        return Backbone(application(weights=None, **kwargs), preprocess, "random")
    if weights in ("imagenet", "auto"):
        try:
            return Backbone(application(weights="imagenet", **kwargs), preprocess, "imagenet")
        except ValueError:
            raise  # a real incompatibility, not a download problem
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            reason = str(exc).splitlines()[0][:200]
            if weights == "imagenet":
                raise ConfigError(
                    "backbone.weights",
                    f"ImageNet weights for {cfg.name} could not be loaded ({reason}). "
                    "Use backbone.weights=/path/to/weights.h5, backbone.weights=auto "
                    "(train from random initialisation instead) or backbone.weights=null.",
                ) from exc
            log.warning(
                "\n%s\n!! ImageNet weights for %s are unavailable (%s).\n"
                "!! Training from RANDOM initialisation: no transfer learning in this run.\n"
                "!! Pass backbone.weights=/path/to/weights.h5 to use a local copy.\n%s",
                "!" * 78, cfg.name, reason, "!" * 78,
            )
            return Backbone(application(weights=None, **kwargs), preprocess, "random (imagenet unavailable)")

    path = Path(weights).expanduser().resolve()
    try:
        model = application(weights=str(path), **kwargs)
    except ValueError as exc:
        raise ConfigError(
            "backbone.weights", f"{path} does not fit backbone {cfg.name}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    return Backbone(model, preprocess, f"file:{path}")


def _tiny_cnn(shape, width: int):
    """Four conv-BN-ReLU blocks, widths doubling: trains in seconds on a CPU."""
    import keras
    from keras import layers

    inputs = keras.Input(shape)
    x = inputs
    for block in range(4):
        x = layers.Conv2D(width * 2**block, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name="tiny_cnn")
