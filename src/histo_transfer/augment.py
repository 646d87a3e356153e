"""Batch augmentation as TensorFlow ops (runs inside tf.data, never per image in Python).

Every function takes float32 batches (B, 96, 96, 3) in 0-255 and a stateless seed pair,
so a run with the same trainer.seed sees the same augmentations.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

Augment = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def build_augmentation(cfg, seed: int) -> Augment | None:
    """The augmentation named by `cfg.name`; None for `none`."""
    if cfg.name == "none":
        return None
    if cfg.name == "basic":
        return random_dihedral
    if cfg.name == "strong":
        def strong(images, pair):
            images = random_dihedral(images, pair)
            images = stain_jitter(images, pair + 1, cfg.stain_sigma)
            return brightness_contrast(images, pair + 2, cfg.brightness, cfg.contrast)
        return strong
    if cfg.name == "notebook":
        return _notebook(cfg, seed)
    raise ValueError(f"unknown augmentation {cfg.name}")


def random_dihedral(images: tf.Tensor, pair: tf.Tensor) -> tf.Tensor:
    """One of the 8 flips/90-degree rotations per image, uniformly: transpose, then flip rows, then columns."""
    coins = tf.random.stateless_uniform([tf.shape(images)[0], 3], seed=pair) < 0.5
    images = _where(coins[:, 0], tf.transpose(images, [0, 2, 1, 3]), images)
    images = _where(coins[:, 1], tf.reverse(images, [1]), images)
    return _where(coins[:, 2], tf.reverse(images, [2]), images)


def stain_jitter(images: tf.Tensor, pair: tf.Tensor, sigma: float) -> tf.Tensor:
    """Scale and shift each stain's concentration per image (Tellez et al., 2018), in optical density."""
    batch = tf.shape(images)[0]
    density = -tf.math.log(tf.maximum(images, 1.0) / 255.0)
    stains = tf.einsum("bhwc,cs->bhws", density, _HED_FROM_RGB)
    scale = tf.random.stateless_uniform([batch, 1, 1, 3], seed=pair, minval=1 - sigma, maxval=1 + sigma)
    shift = tf.random.stateless_uniform([batch, 1, 1, 3], seed=pair + 7, minval=-sigma, maxval=sigma)
    density = tf.einsum("bhws,sc->bhwc", stains * scale + shift, _RGB_FROM_HED)
    return tf.clip_by_value(255.0 * tf.exp(-density), 0.0, 255.0)


def brightness_contrast(images: tf.Tensor, pair: tf.Tensor, brightness: float, contrast: float) -> tf.Tensor:
    batch = tf.shape(images)[0]
    delta = tf.random.stateless_uniform([batch, 1, 1, 1], seed=pair, minval=-brightness, maxval=brightness)
    factor = tf.random.stateless_uniform([batch, 1, 1, 1], seed=pair + 3, minval=1 - contrast, maxval=1 + contrast)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((images - mean) * factor + mean + 255.0 * delta, 0.0, 255.0)


def _notebook(cfg, seed: int) -> Augment:
    """ImageDataGenerator-style flips, rotation, shift and zoom with nearest fill, via Keras layers."""
    import keras

    layers = keras.Sequential([
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
        keras.layers.RandomRotation(cfg.rotation_degrees / 360, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomTranslation(cfg.shift, cfg.shift, fill_mode="nearest", seed=seed + 2),
        keras.layers.RandomZoom(cfg.zoom, fill_mode="nearest", seed=seed + 3),
    ])

    def notebook(images, pair):
        return layers(images, training=True)
    return notebook


def _where(condition, when_true, when_false):
    return tf.where(condition[:, None, None, None], when_true, when_false)
