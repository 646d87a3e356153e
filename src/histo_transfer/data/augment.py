"""Batch augmentation as TensorFlow ops (runs inside tf.data, never per image in Python).

Every function takes a batch (B, 96, 96, 3) of RGB 0-255 (uint8 from the pipeline; flips and turns
keep it uint8, resampling and colour jitter return float32, `pathology` rounds back to uint8) and a
stateless seed pair, so a run with the same trainer.seed sees the same augmentations. The model casts
its input itself.

The random draws are plain TensorFlow ops; the per-pixel maths runs in functions XLA compiles into
one loop (`_fused`). TensorFlow on a CPU makes one memory-bound pass over the batch per op; fused,
`notebook` costs a quarter and `pathology` about half of the CPU time, time that at 96 px the
training step no longer waits for (README, "Is my run limited by input or by compute?").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import numpy as np

from histo_transfer.config.options import Options, between
from histo_transfer.data.images import patch_grid

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


def _fused(maths: Callable) -> Callable:
    """`maths` (tensors in, tensors out) compiled by XLA on first call, for each batch shape."""
    compiled = []

    def call(*tensors):
        if not compiled:
            import tensorflow as tf

            compiled.append(tf.function(maths, jit_compile=True))
        return compiled[0](*tensors)
    return call


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
    """One of the 8 flips/90-degree rotations per (square) image, uniformly, in the images' own dtype."""
    return _dihedral(images, _dihedral_views(images, pair))


def _dihedral_views(images, pair):
    """Per image, which view: bit 4 transposes, then bit 2 reverses the rows and bit 1 the columns."""
    import tensorflow as tf

    return tf.random.stateless_uniform([tf.shape(images)[0]], seed=pair, maxval=8, dtype=tf.int32)


@_fused
def _dihedral(images, views):
    """Each image's view as one gather of pixels (compiled on its own: XLA would repeat a fused gather
    for every read of its output)."""
    import tensorflow as tf

    batch, size = tf.shape(images)[0], tf.shape(images)[1]
    views = views[:, None, None]
    rows, columns = tf.range(size)[None, :, None], tf.range(size)[None, None, :]
    rows = tf.where((views & 2) > 0, size - 1 - rows, rows)
    columns = tf.where((views & 1) > 0, size - 1 - columns, columns)
    turned = (views & 4) > 0
    source = tf.where(turned, columns, rows) * size + tf.where(turned, rows, columns)
    pixels = tf.reshape(images, [-1, tf.shape(images)[3]])
    return tf.gather(pixels, (tf.range(batch) * size * size)[:, None, None] + source)


def stain_jitter(images, pair, sigma: float):
    """Scale and shift each stain's concentration per image (Tellez et al., 2018), in optical density."""
    return _fused_stain(images, *_stain_parameters(images, pair, sigma))


def _stain_parameters(images, pair, sigma: float):
    """Per image, the stain jitter as a 3x3 matrix and an offset on log pixels: (B, 3, 3), (B, 3).

    Optical density to stains, the jitter and back are linear, so they fold into one matrix and an
    offset, as do the 1/255 scaling and the 255 of the way back: log, one matrix product, exp per pixel."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    scale = tf.random.stateless_uniform([batch, 3], seed=pair, minval=1 - sigma, maxval=1 + sigma)
    shift = tf.random.stateless_uniform([batch, 3], seed=pair + 7, minval=-sigma, maxval=sigma)
    # density d = log 255 - log x;  d' = (d H) * scale + shift) R;  x' = 255 exp(-d') = exp(log x . M + c)
    matrix = tf.einsum("cs,bs,sd->bcd", _HED_FROM_RGB, scale, _RGB_FROM_HED)  # stain-space jitter, back to RGB
    offset = np.log(255.0) * (1.0 - tf.reduce_sum(matrix, axis=1)) - tf.einsum("bs,sd->bd", shift, _RGB_FROM_HED)
    return matrix, offset


def _stained(images, matrix, offset):
    import tensorflow as tf

    log_pixels = tf.math.log(tf.maximum(tf.cast(images, tf.float32), 1.0))
    return tf.minimum(tf.exp(_mixed(log_pixels, matrix) + offset[:, None, None, :]), 255.0)


def _mixed(images, matrix):
    """Each image's pixels (B, H, W, 3) times its own 3x3 matrix (B, 3, 3), as three multiply-adds:
    as an einsum it becomes a batched matrix product that XLA neither fuses nor vectorises (the stain
    step took 50 % longer)."""
    return sum(images[..., channel:channel + 1] * matrix[:, None, None, channel, :] for channel in range(3))


_fused_stain = _fused(_stained)


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
        return _affine_bilinear(images, tf.stack([a00, a01, b0, a10, a11, b1], axis=1))
    return augment


@_fused
def _affine_bilinear(images, transforms):
    """Output pixel (x, y) of image b reads the input at (t0 x + t1 y + t2, t3 x + t4 y + t5), t =
    transforms[b], bilinearly; points outside move to the nearest edge (ImageDataGenerator's
    fill_mode="nearest"). What ImageProjectiveTransformV3 computes, but the point once per pixel
    rather than per channel, and fused: a quarter of its CPU time. float32 out."""
    import tensorflow as tf

    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    rows = tf.range(tf.cast(height, tf.float32))[None, :, None]
    columns = tf.range(tf.cast(width, tf.float32))[None, None, :]
    t = transforms[:, :, None, None]
    x = tf.clip_by_value(t[:, 0] * columns + t[:, 1] * rows + t[:, 2], 0.0, tf.cast(width - 1, tf.float32))
    y = tf.clip_by_value(t[:, 3] * columns + t[:, 4] * rows + t[:, 5], 0.0, tf.cast(height - 1, tf.float32))
    left, top = tf.floor(x), tf.floor(y)
    across, down = (x - left)[..., None], (y - top)[..., None]
    x0, y0 = tf.cast(left, tf.int32), tf.cast(top, tf.int32)
    x1, y1 = tf.minimum(x0 + 1, width - 1), tf.minimum(y0 + 1, height - 1)
    pixels = tf.cast(tf.reshape(images, [-1, tf.shape(images)[3]]), tf.float32)
    first = (tf.range(batch) * height * width)[:, None, None]

    def at(row, column):
        return tf.gather(pixels, first + row * width + column)

    upper = at(y0, x0) + across * (at(y0, x1) - at(y0, x0))
    lower = at(y1, x0) + across * (at(y1, x1) - at(y1, x0))
    return upper + down * (lower - upper)


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
    Gaussian blur, Gaussian noise and JPEG re-compression at a random quality; uint8 out."""
    import tensorflow as tf

    low_quality, high_quality = cfg.jpeg_quality
    kernel = tf.constant(_gaussian_kernel(cfg.blur_sigma))
    # Drawing fresh normal noise for every pixel costs more than all the other steps together on a
    # CPU; a seeded bank of unit-noise tiles, one picked and scaled per image, costs a gather.
    bank = tf.constant(np.random.default_rng(seed).standard_normal((NOISE_TILES, 96, 96, 3)), tf.float32)

    def augment(images, pair):
        views = _dihedral_views(images, pair)
        count = tf.shape(images)[0]

        def per_image(offset, low, high):
            return tf.random.stateless_uniform([count], seed=pair + offset, minval=low, maxval=high)

        stain, stain_offset = _stain_parameters(images, pair + 1, cfg.stain_sigma)
        # hue and saturation: one 3x3 matrix per patch (a rotation and scaling of YIQ's colour plane,
        # as NVIDIA DALI's hsv operator does), instead of a round trip through HSV
        angle = per_image(2, -cfg.hue, cfg.hue) * (2 * np.pi)
        saturation = per_image(3, 1 - cfg.saturation, 1 + cfg.saturation)
        cos, sin, ones, zeros = saturation * tf.cos(angle), saturation * tf.sin(angle), tf.ones([count]), tf.zeros([count])
        plane = tf.reshape(tf.stack([ones, zeros, zeros, zeros, cos, -sin, zeros, sin, cos], axis=1), [count, 3, 3])
        colour = tf.einsum("ij,bjk,kl->bli", _RGB_FROM_YIQ, plane, _YIQ_FROM_RGB)  # transposed: pixels are rows
        blurred, strength = _blur_choice(count, pair + 4, cfg.blur_probability)
        tile = tf.random.stateless_uniform([count], seed=pair + 6, maxval=NOISE_TILES, dtype=tf.int32)
        noise = per_image(7, 0, cfg.noise_std)
        # the view in its own compiled call: fused into the maths below, XLA would recompute the
        # gather for every read of a pixel (nearly twice the time of both calls together)
        pixels = _pathology_pixels(_dihedral(images, views), stain, stain_offset, colour, blurred, strength,
                                   kernel, bank, tile, noise)
        return _jpeg_recompress(pixels, pair + 8, cfg.jpeg_probability, low_quality, high_quality)
    return augment


@_fused
def _pathology_pixels(images, stain, stain_offset, colour, blurred, strength, kernel, bank, tile, noise):
    """Stain jitter, each image's colour matrix, blur blend, noise tile; rounded to uint8."""
    import tensorflow as tf

    images = _mixed(_stained(images, stain, stain_offset), colour)
    images = _blur_some(images, blurred, strength, kernel)
    images = images + tf.gather(bank, tile) * noise[:, None, None, None]
    return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8)


def _blur_choice(count, pair, probability: float):
    """Which images to blur and how far towards their Gaussian blur: round(probability * count) of
    them, drawn at random, each with a random strength in [0, 1). A fixed number per batch (rather
    than a coin per image) keeps the blur's shapes static, so XLA blurs only those images."""
    import tensorflow as tf

    share = tf.cast(tf.round(probability * tf.cast(count, tf.float32)), tf.int32)
    chosen = tf.argsort(tf.random.stateless_uniform([count], seed=pair + 1))[:share]
    return chosen, tf.gather(tf.random.stateless_uniform([count], seed=pair), chosen)


def _blur_some(images, chosen, strength, kernel):
    """The `chosen` images blended with their Gaussian blur (zero padding) by their `strength`; the
    blur as the kernel's two 1-D halves, each a sum of shifted copies that XLA fuses into one pass."""
    import tensorflow as tf

    taps, radius = kernel.shape[0], kernel.shape[0] // 2
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    some = tf.gather(images, chosen)
    padded = tf.pad(some, [[0, 0], [radius, radius], [0, 0], [0, 0]])
    blurred = sum(kernel[tap] * padded[:, tap:tap + height] for tap in range(taps))
    padded = tf.pad(blurred, [[0, 0], [0, 0], [radius, radius], [0, 0]])
    blurred = sum(kernel[tap] * padded[:, :, tap:tap + width] for tap in range(taps))
    return tf.tensor_scatter_nd_update(images, chosen[:, None], some + strength[:, None, None, None] * (blurred - some))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """The weights of a 1-D Gaussian blur, radius 2 sigma (at least 1)."""
    radius = max(1, int(round(2 * sigma)))
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _jpeg_recompress(images, pair, probability: float, low: int, high: int):
    """Encode and decode a random share of the uint8 images as JPEG at a quality drawn in [low, high];
    only the chosen ones pass through the codec."""
    import tensorflow as tf

    count = tf.shape(images)[0]
    chosen = tf.where(tf.random.stateless_uniform([count], seed=pair, minval=0, maxval=1) < probability)
    qualities = tf.random.stateless_uniform([count], seed=pair + 1, minval=low, maxval=high + 1, dtype=tf.int32)
    recoded = tf.map_fn(lambda item: tf.image.adjust_jpeg_quality(item[0], item[1]),
                        (tf.gather_nd(images, chosen), tf.gather_nd(qualities, chosen)),
                        fn_output_signature=tf.TensorSpec(images.shape[1:], tf.uint8))  # a static shape: none may be chosen
    return tf.tensor_scatter_nd_update(images, chosen, recoded)


def plot_examples(augment: Augment | None, images: np.ndarray, path, name: str, draws: int = 3) -> None:
    """A grid: the patches as stored (top row), then `draws` augmented versions of each (seeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    rows = [images] + [np.clip(augment(tf.constant(images), tf.constant([draw, 0], tf.int64)).numpy(), 0, 255)
                       .astype(np.uint8) for draw in range(1, draws + 1)] if augment is not None else [images]
    fig, ax = plt.subplots(figsize=(1.6 * len(images), 1.7 * len(rows)))
    ax.imshow(patch_grid([list(batch) for batch in rows]))
    ax.set_yticks([(images.shape[1] + 4) * row + images.shape[1] / 2 for row in range(len(rows))],
                  ["stored"] + [f"draw {row}" for row in range(1, len(rows))], fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(f"augmentation={name}: training patches as stored and as the model sees them")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
