"""tf.data pipeline over an indexable image array (in memory or memory-mapped)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from histo_transfer import IMAGE_SHAPE


def make_dataset(images, labels: np.ndarray, indices: np.ndarray, batch_size: int, *,
                 shuffle: bool = False, augment=None, seed: int = 0, epochs: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
    """Batches of (RGB 0-255 images, float32 (B, 1) labels); augmentation runs on whole batches.

    With `shuffle`, the dataset holds the epochs `epochs[0]` up to `epochs[1]` back to back (fit it
    with steps_per_epoch = steps_per_epoch(len(indices), batch_size)); epoch e's order and
    augmentations depend only on (seed, e), so a run resumed at epoch e sees what it would have seen.
    Images stay uint8 unless an augmentation needs floats: a quarter of the bytes to move, and the
    model casts them on its own device.
    """

    def gather(batch_indices):
        return images[batch_indices], labels[batch_indices].astype(np.float32)[:, None]

    def load(batch_indices):
        x, y = tf.numpy_function(gather, [batch_indices], (tf.uint8, tf.float32))
        return tf.ensure_shape(x, (None, *IMAGE_SHAPE)), tf.ensure_shape(y, (None, 1))

    ordered = tf.constant(np.asarray(indices, dtype=np.int64))
    if not shuffle:
        return tf.data.Dataset.from_tensor_slices(ordered).batch(batch_size).map(
            load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(ordered, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        # a stateless seed pair per batch for the augmentation: (seed + epoch, batch number)
        return batches.map(lambda number, batch: (batch, tf.stack([seed + epoch, number])))

    def load_and_augment(batch_indices, pair):
        x, y = load(batch_indices)
        return (augment(x, pair) if augment is not None else x), y

    dataset = tf.data.Dataset.range(*epochs).flat_map(one_epoch)
    return dataset.map(load_and_augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(count: int, batch_size: int) -> int:
    return -(-count // batch_size)
