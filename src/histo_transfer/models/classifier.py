"""The notebook's classifier: backbone with its own preprocess_input, then the dense head."""

from __future__ import annotations

import logging

import keras
from keras import layers

from histo_transfer import IMAGE_SHAPE
from histo_transfer.models.backbones import Backbone, build_backbone

log = logging.getLogger(__name__)


def build_classifier(backbone_cfg, head_cfg) -> tuple[keras.Model, Backbone]:
    """Raw RGB 0-255 patches in, float32 probability of label 1 out.

    Resizing and preprocessing live inside the model, so the saved file needs no project code.
    """
    backbone = build_backbone(backbone_cfg, backbone_cfg.input_size)
    trainable = set_trainable_fraction(backbone, backbone_cfg.fine_tune_fraction)

    inputs = keras.Input(IMAGE_SHAPE, name="rgb")
    x = inputs
    if backbone_cfg.input_size != IMAGE_SHAPE[0]:
        x = layers.Resizing(backbone_cfg.input_size, backbone_cfg.input_size, name="resize")(x)
    x = backbone.preprocess_input(x)
    # Pretrained BatchNorm statistics stay frozen (inference mode) while fine-tuning, as the
    # Keras transfer-learning guide advises; a randomly initialised backbone must learn them.
    x = backbone.model(x, training=False) if backbone.pretrained else backbone.model(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(head_cfg.dropout)(x)
    x = layers.Dense(head_cfg.units, activation="relu")(x)
    x = layers.BatchNormalization(momentum=head_cfg.bn_momentum)(x)
    x = layers.Dense(head_cfg.units, activation="relu")(x)
    x = layers.BatchNormalization(momentum=head_cfg.bn_momentum)(x)
    x = layers.Dense(1)(x)
    # float32 even under mixed_float16, so probabilities are not rounded to half precision
    outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    model = keras.Model(inputs, outputs, name=f"{backbone_cfg.name}_classifier")
    log.info("backbone %s: %d of %d layers trainable, weights: %s",
             backbone_cfg.name, trainable, len(backbone.model.layers), backbone.weights_source)
    return model, backbone


def set_trainable_fraction(backbone: Backbone, fraction: float) -> int:
    """Unfreeze the top `fraction` of the backbone's layers; returns how many are trainable.

    A randomly initialised backbone has nothing worth freezing, so it trains whole.
    """
    model_layers = backbone.model.layers
    if not backbone.pretrained:
        if fraction < 1:
            log.warning("backbone weights are random: training all its layers "
                        "(backbone.fine_tune_fraction=%s applies to pretrained weights only)", fraction)
        fraction = 1.0
        # ImageNet recipes use BN momentum 0.99-0.999, tuned for ~10^5 steps; in a short run from
        # scratch the moving statistics would stay at their initial values and break validation.
        for layer in model_layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = min(layer.momentum, 0.9)
    first = round(len(model_layers) * (1 - fraction))
    backbone.model.trainable = fraction > 0
    for index, layer in enumerate(model_layers):
        layer.trainable = index >= first
    return len(model_layers) - first
