"""Where the model looks: Grad-CAM heat maps over the backbone's last convolutional block, as in the
Keras Grad-CAM example (gradient of the label-1 logit, averaged per channel, weighting the channels)."""

from __future__ import annotations

import numpy as np

from histo_transfer import IMAGE_SHAPE

CENTRE = 32  # the Kaggle label is defined by the centre 32x32 pixels


def explainable(model) -> bool:
    """Whether `model` is this project's classifier (backbone, pooling, head), which Grad-CAM reads."""
    import keras

    names = {layer.name for layer in model.layers}
    return "probability" in names and any(isinstance(layer, keras.layers.GlobalAveragePooling2D)
                                          for layer in model.layers)


def grad_cam(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, 96, 96) heat maps in [0, 1] for raw 0-255 patches, one per image (its own maximum is 1)."""
    import keras
    import tensorflow as tf

    features = next(layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)).input
    logit = model.get_layer("probability").input  # before the sigmoid: gradients do not saturate
    mapper = keras.Model(model.inputs, [features, logit])
    maps = []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(np.asarray(images[start:start + batch_size], dtype=np.float32))
        with tf.GradientTape() as tape:
            activations, score = mapper(batch, training=False)
            score = tf.reduce_sum(tf.cast(score, tf.float32))
        gradients = tape.gradient(score, activations)
        weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
        heat = tf.nn.relu(tf.reduce_sum(weights * tf.cast(activations, tf.float32), axis=-1, keepdims=True))
        heat = tf.image.resize(heat, IMAGE_SHAPE[:2], method="bilinear")[..., 0]
        peak = tf.reduce_max(heat, axis=(1, 2), keepdims=True)
        maps.append((heat / tf.maximum(peak, 1e-12)).numpy())
    return np.concatenate(maps) if maps else np.zeros((0, *IMAGE_SHAPE[:2]), np.float32)


def centre_fraction(heat: np.ndarray) -> float:
    """Mean share of the heat inside the centre 32x32 region (0.111 for heat spread evenly)."""
    if len(heat) == 0:
        return float("nan")
    low = (heat.shape[1] - CENTRE) // 2
    inside = heat[:, low:low + CENTRE, low:low + CENTRE].sum(axis=(1, 2))
    total = heat.sum(axis=(1, 2))
    return float(np.mean(np.divide(inside, total, out=np.full_like(inside, CENTRE**2 / heat[0].size), where=total > 0)))


def overlaid(image: np.ndarray, heat: np.ndarray | None, opacity: float = 0.35) -> np.ndarray:
    """The patch as uint8 RGB with its heat map blended over it (jet colours) and the centre 32x32
    region outlined in white: what `overlay` draws, as pixels for a grid of patches."""
    from matplotlib import colormaps

    out = np.asarray(image, dtype=np.float32)[..., :3].copy()
    if heat is not None:
        out = (1 - opacity) * out + opacity * 255 * colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    low, high = (out.shape[0] - CENTRE) // 2, (out.shape[0] + CENTRE) // 2 - 1
    out[low:high + 1, [low, high]] = out[[low, high], low:high + 1] = 255
    return out.astype(np.uint8)


def overlay(ax, image: np.ndarray, heat: np.ndarray | None) -> None:
    """A patch with its heat map over it, and the centre 32x32 region outlined."""
    import matplotlib.patches as patches

    ax.imshow(image)
    if heat is not None:
        ax.imshow(heat, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    low = (image.shape[0] - CENTRE) / 2 - 0.5
    ax.add_patch(patches.Rectangle((low, low), CENTRE, CENTRE, fill=False, edgecolor="white", linewidth=0.8))
    ax.axis("off")
