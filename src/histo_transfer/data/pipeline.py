"""tf.data pipeline over an indexable image array (in memory or memory-mapped)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from histo_transfer import IMAGE_SHAPE


def make_dataset(images, labels: np.ndarray, indices: np.ndarray, batch_size: int, *,
                 shuffle: bool = False, augment=None, seed: int = 0) -> tf.data.Dataset:
    """Batches of (RGB 0-255 images, float32 (B, 1) labels); augmentation runs on whole batches.

    Images stay uint8 unless an augmentation needs floats: a quarter of the bytes to move, and the
    model casts them on its own device.
    """

    def gather(batch_indices):
        return images[batch_indices], labels[batch_indices].astype(np.float32)[:, None]

    def load(batch_indices):
        x, y = tf.numpy_function(gather, [batch_indices], (tf.uint8, tf.float32))
        return tf.ensure_shape(x, (None, *IMAGE_SHAPE)), tf.ensure_shape(y, (None, 1))

    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, dtype=np.int64))
    if shuffle:
        dataset = dataset.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        # a fresh stateless seed pair per batch and per epoch, all derived from `seed`
        pairs = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, pairs).map(
            lambda batch, pair: (augment(batch[0], pair), batch[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
