"""Batch augmentation as TensorFlow ops (runs inside tf.data, never per image in Python).

Every function takes a batch (B, 96, 96, 3) of RGB 0-255 (uint8 from the pipeline; geometric
augmentation keeps it uint8, colour augmentation returns float32) and a stateless seed pair, so a
run with the same trainer.seed sees the same augmentations. The model casts its input itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import numpy as np

from histo_transfer.options import Options, between

# TensorFlow is imported inside the functions: config validation reads this registry first.
Augment = Callable  # (images, stateless seed pair) -> images, as TensorFlow ops
AUGMENTATIONS = Options("augmentation")
NOISE_TILES = 64  # pathology's bank of noise patterns

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
# RGB <-> YIQ: hue is the angle and saturation the length of (I, Q), so both are one linear map in RGB
_YIQ_FROM_RGB = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_RGB_FROM_YIQ = np.linalg.inv(_YIQ_FROM_RGB).astype(np.float32)


@dataclass
class AugmentationKeys:
    name: str


@dataclass
class StrongKeys(AugmentationKeys):
    stain_sigma: float = between(0, 1)
    brightness: float = between(0, 1)
    contrast: float = between(0, 1)


@dataclass
class NotebookKeys(AugmentationKeys):
    rotation_degrees: float = between(0, 180)
    shift: float = between(0, 1, high_open=True)
    zoom: float = between(0, 1, high_open=True)


def build_augmentation(cfg, seed: int) -> Augment | None:
    """The augmentation named by `cfg.name`; None for `none`."""
    return AUGMENTATIONS[cfg.name](cfg, seed)


@AUGMENTATIONS.register("none", AugmentationKeys)
def no_augmentation(cfg, seed: int) -> None:
    return None


@AUGMENTATIONS.register("basic", AugmentationKeys)
def basic(cfg, seed: int) -> Augment:
    return random_dihedral


@AUGMENTATIONS.register("strong", StrongKeys)
def strong(cfg, seed: int) -> Augment:
    """basic + H&E stain jitter, brightness and contrast (float32 out)."""

    def augment(images, pair):
        images = stain_jitter(random_dihedral(images, pair), pair + 1, cfg.stain_sigma)
        return brightness_contrast(images, pair + 2, cfg.brightness, cfg.contrast)
    return augment


def random_dihedral(images, pair):
    """One of the 8 flips/90-degree rotations per image, uniformly, in the images' own dtype.

    The batch is partitioned by the drawn view and each part transformed as a whole: ten times
    faster on a CPU than selecting per image with tf.where, which computes every view of every image.
    """
    import tensorflow as tf

    count = tf.shape(images)[0]
    view = tf.random.stateless_uniform([count], seed=pair, maxval=8, dtype=tf.int32)
    parts = tf.dynamic_partition(images, view, 8)
    positions = tf.dynamic_partition(tf.range(count), view, 8)
    for index in range(8):
        if index & 4:
            parts[index] = tf.transpose(parts[index], [0, 2, 1, 3])
        axes = [axis for axis, flip in ((1, index & 2), (2, index & 1)) if flip]
        if axes:
            parts[index] = tf.reverse(parts[index], axes)  # one pass for both flips
    return tf.dynamic_stitch(positions, parts)


def stain_jitter(images, pair, sigma: float):
    """Scale and shift each stain's concentration per image (Tellez et al., 2018), in optical density.

    Optical density to stains, the jitter and back are linear, so they fold into one 3x3 matrix and an
    offset per image, as do the 1/255 scaling and the 255 of the way back: log, one matrix product,
    exp (half the work of doing each step on every pixel)."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    scale = tf.random.stateless_uniform([batch, 3], seed=pair, minval=1 - sigma, maxval=1 + sigma)
    shift = tf.random.stateless_uniform([batch, 3], seed=pair + 7, minval=-sigma, maxval=sigma)
    # density d = log 255 - log x;  d' = (d H) * scale + shift) R;  x' = 255 exp(-d') = exp(log x . M + c)
    matrix = tf.einsum("cs,bs,sd->bcd", _HED_FROM_RGB, scale, _RGB_FROM_HED)  # stain-space jitter, back to RGB
    offset = np.log(255.0) * (1.0 - tf.reduce_sum(matrix, axis=1)) - tf.einsum("bs,sd->bd", shift, _RGB_FROM_HED)
    log_pixels = tf.math.log(tf.maximum(tf.cast(images, tf.float32), 1.0))
    jittered = tf.einsum("bhwc,bcd->bhwd", log_pixels, matrix) + offset[:, None, None, :]
    return tf.minimum(tf.exp(jittered), 255.0)


def brightness_contrast(images, pair, brightness: float, contrast: float):
    import tensorflow as tf

    batch = tf.shape(images)[0]
    delta = tf.random.stateless_uniform([batch, 1, 1, 1], seed=pair, minval=-brightness, maxval=brightness)
    factor = tf.random.stateless_uniform([batch, 1, 1, 1], seed=pair + 3, minval=1 - contrast, maxval=1 + contrast)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((images - mean) * factor + mean + 255.0 * delta, 0.0, 255.0)


@AUGMENTATIONS.register("notebook", NotebookKeys)
def notebook(cfg, seed: int) -> Augment:
    """ImageDataGenerator-style flips, rotation, shift and zoom with nearest fill, composed into ONE
    affine transform per image: one resampling pass instead of one per layer (3x less work)."""
    import tensorflow as tf

    def augment(images, pair):
        images = tf.cast(images, tf.float32)  # float32 resampling: faster on a CPU than uint8's
        count, size = tf.shape(images)[0], tf.cast(tf.shape(images)[1], tf.float32)

        def uniform(offset, low, high):
            return tf.random.stateless_uniform([count], seed=pair + offset, minval=low, maxval=high)

        angle = uniform(1, -cfg.rotation_degrees, cfg.rotation_degrees) * (np.pi / 180)
        scale = uniform(2, 1 - cfg.zoom, 1 + cfg.zoom)
        shift_x, shift_y = uniform(3, -cfg.shift, cfg.shift) * size, uniform(4, -cfg.shift, cfg.shift) * size
        flip_x = tf.where(uniform(5, 0, 1) < 0.5, -1.0, 1.0)
        flip_y = tf.where(uniform(6, 0, 1) < 0.5, -1.0, 1.0)
        # output pixel p reads input pixel A (p - c) + c + shift, with A = rotation . zoom . flips
        cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
        a00, a01, a10, a11 = cos * flip_x, -sin * flip_y, sin * flip_x, cos * flip_y
        centre = (size - 1) / 2
        b0 = centre - a00 * centre - a01 * centre + shift_x
        b1 = centre - a10 * centre - a11 * centre + shift_y
        zeros = tf.zeros_like(a00)
        transforms = tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="NEAREST")
    return augment


@dataclass
class PathologyKeys(AugmentationKeys):
    stain_sigma: float = between(0, 1)
    hue: float = between(0, 0.5)
    saturation: float = between(0, 1)
    blur_probability: float = between(0, 1)
    blur_sigma: float = between(0, 5, low_open=True)
    noise_std: float = between(0, 255)
    jpeg_probability: float = between(0, 1)
    jpeg_quality: List[int]


@AUGMENTATIONS.register("pathology", PathologyKeys)
def pathology(cfg, seed: int) -> Augment:
    """For other labs and scanners: dihedral views, stronger per-stain HED jitter, hue and saturation,
    Gaussian blur, Gaussian noise and JPEG re-compression at a random quality; float32 out."""
    import tensorflow as tf

    low_quality, high_quality = cfg.jpeg_quality
    kernel = _gaussian_kernel(cfg.blur_sigma)
    # Drawing fresh normal noise for every pixel costs more than all the other steps together on a
    # CPU; a seeded bank of unit-noise tiles, one picked and scaled per image, costs a gather.
    bank = tf.constant(np.random.default_rng(seed).standard_normal((NOISE_TILES, 96, 96, 3)), tf.float32)

    def augment(images, pair):
        images = random_dihedral(images, pair)
        count = tf.shape(images)[0]

        def per_image(offset, low, high, shape=(1, 1, 1)):
            return tf.random.stateless_uniform([count, *shape], seed=pair + offset, minval=low, maxval=high)

        images = stain_jitter(images, pair + 1, cfg.stain_sigma)
        # hue and saturation: one 3x3 matrix per patch (a rotation and scaling of YIQ's colour plane,
        # as NVIDIA DALI's hsv operator does), instead of a round trip through HSV
        angle = per_image(2, -cfg.hue, cfg.hue, ()) * (2 * np.pi)
        saturation = per_image(3, 1 - cfg.saturation, 1 + cfg.saturation, ())
        cos, sin, ones, zeros = saturation * tf.cos(angle), saturation * tf.sin(angle), tf.ones([count]), tf.zeros([count])
        plane = tf.reshape(tf.stack([ones, zeros, zeros, zeros, cos, -sin, zeros, sin, cos], axis=1), [count, 3, 3])
        colour = tf.einsum("ij,bjk,kl->bil", _RGB_FROM_YIQ, plane, _YIQ_FROM_RGB)
        images = tf.einsum("bhwc,bdc->bhwd", images, colour)
        images = _blur_some(images, pair + 4, cfg.blur_probability, kernel)
        tile = tf.random.stateless_uniform([count], seed=pair + 6, maxval=NOISE_TILES, dtype=tf.int32)
        noise = tf.gather(bank, tile) * per_image(7, 0, cfg.noise_std)
        images = tf.clip_by_value(images + noise, 0, 255)
        return _jpeg_recompress(images, pair + 8, cfg.jpeg_probability, low_quality, high_quality)
    return augment


def _blur_some(images, pair, probability: float, kernel):
    """Blur a random share of the images, each by a random amount (a blend with its full Gaussian
    blur); only the chosen ones are convolved, with the kernel's two 1-D halves."""
    import tensorflow as tf

    count = tf.shape(images)[0]
    chosen = tf.where(tf.random.stateless_uniform([count], seed=pair + 1) < probability)
    some = tf.gather_nd(images, chosen)
    blurred = tf.nn.depthwise_conv2d(some, kernel[:, None], strides=[1, 1, 1, 1], padding="SAME")
    blurred = tf.nn.depthwise_conv2d(blurred, kernel[None], strides=[1, 1, 1, 1], padding="SAME")
    strength = tf.gather_nd(tf.random.stateless_uniform([count, 1, 1, 1], seed=pair), chosen)
    return tf.tensor_scatter_nd_update(images, chosen, some + strength * (blurred - some))


def _gaussian_kernel(sigma: float):
    """One dimension of a Gaussian blur, as a depthwise kernel over 3 channels: (k, 3, 1)."""
    radius = max(1, int(round(2 * sigma)))
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return np.repeat((weights / weights.sum())[:, None, None], 3, axis=1).astype(np.float32)


def _jpeg_recompress(images, pair, probability: float, low: int, high: int):
    """Encode and decode a random share of the images as JPEG at a quality drawn in [low, high]."""
    import tensorflow as tf

    count = tf.shape(images)[0]
    chosen = tf.random.stateless_uniform([count], seed=pair, minval=0, maxval=1) < probability
    qualities = tf.random.stateless_uniform([count], seed=pair + 1, minval=low, maxval=high + 1, dtype=tf.int32)
    pixels = tf.cast(tf.round(images), tf.uint8)

    def recompress(item):
        image, quality, apply = item
        return tf.cond(apply, lambda: tf.image.adjust_jpeg_quality(image, quality), lambda: image)

    out = tf.map_fn(recompress, (pixels, qualities, chosen), fn_output_signature=tf.uint8)
    return tf.cast(out, tf.float32)


def plot_examples(augment: Augment | None, images: np.ndarray, path, name: str, draws: int = 3) -> None:
    """A grid: the patches as stored (top row), then `draws` augmented versions of each (seeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    rows = [images] + [np.clip(augment(tf.constant(images), tf.constant([draw, 0], tf.int64)).numpy(), 0, 255)
                       .astype(np.uint8) for draw in range(1, draws + 1)] if augment is not None else [images]
    fig, axes = plt.subplots(len(rows), len(images), figsize=(1.6 * len(images), 1.7 * len(rows)), squeeze=False)
    for row, batch in enumerate(rows):
        for column, image in enumerate(batch):
            axes[row, column].imshow(image)
            axes[row, column].axis("off")
        axes[row, 0].set_title("stored" if row == 0 else f"draw {row}", fontsize=8, loc="left")
    fig.suptitle(f"augmentation={name}: training patches as stored and as the model sees them")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
