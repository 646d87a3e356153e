"""tf.data pipeline over the packed cache (memory-mapped) or an image array in memory."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from histo_transfer import IMAGE_SHAPE

RECORD_BYTES = int(np.prod(IMAGE_SHAPE))


SHUFFLE_BUFFER = 8192  # patches (about 230 MB): sources list patches in random id order already
READ_CHUNK = 256  # records decoded per step


def make_dataset(images, labels: np.ndarray, indices: np.ndarray, batch_size: int, *,
                 shuffle: bool = False, augment=None, seed: int = 0, epochs: tuple[int, int] = (0, 1),
                 steps: int | None = None) -> tf.data.Dataset:
    """Batches of (RGB 0-255 uint8 images, float32 (B, 1) labels) of the patches `indices`; `labels` of
    shape (N, k) give (B, k) targets.

    A memory-mapped cache is read by TensorFlow itself, record by record, never through Python: a
    Python step inside tf.data (numpy_function) can deadlock when Keras drops an iterator while that
    step waits for the GIL. Unshuffled batches come in index order. With `shuffle`, the dataset holds
    the epochs `epochs[0]` up to `epochs[1]` back to back (fit with steps_per_epoch); epoch e's order
    and augmentations depend only on (seed, e), so a resumed run sees what it would have seen;
    `steps` caps the batches of each epoch (debug runs).
    The model casts the uint8 images itself, on its own device.
    """
    wanted = np.zeros(len(labels), dtype=bool)
    wanted[np.asarray(indices, dtype=np.int64)] = True
    wanted_t, labels_t = tf.constant(wanted), tf.constant(np.asarray(labels, np.float32))

    def patches() -> tf.data.Dataset:
        """(index, image) of the wanted patches, in index order."""
        if isinstance(images, np.memmap):
            records = tf.data.FixedLengthRecordDataset(str(images.filename), RECORD_BYTES, header_bytes=images.offset,
                                                       buffer_size=1 << 22)

            def decode(chunk_number, raw):  # a chunk of records at a time: per-patch steps are what cost
                block = tf.reshape(tf.io.decode_raw(raw, tf.uint8), (-1, *IMAGE_SHAPE))
                index = chunk_number * READ_CHUNK + tf.range(tf.shape(block)[0], dtype=tf.int64)
                keep = tf.gather(wanted_t, index)
                return tf.boolean_mask(index, keep), tf.boolean_mask(block, keep)

            chunks = records.batch(READ_CHUNK).enumerate().map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            # unbatch forgets how many patches come: said here, Keras knows where each epoch ends
            # (an unknown length ends each epoch and evaluation with "Your input ran out of data")
            return chunks.unbatch().apply(tf.data.experimental.assert_cardinality(int(wanted.sum())))
        order = np.flatnonzero(wanted)  # an array in memory (tests, small sets)
        return tf.data.Dataset.from_tensor_slices((order, np.asarray(images)[order]))

    def labelled(index, image):  # (B, 1); (B, k) for targets of k columns (a label and a teacher's)
        return image, tf.reshape(tf.gather(labels_t, index), (tf.shape(index)[0], -1))

    if not shuffle:
        return patches().batch(batch_size).map(labelled).prefetch(tf.data.AUTOTUNE)

    def one_epoch(epoch: int) -> tf.data.Dataset:
        # Python-int seeds: TensorFlow's op seeds must not be tensors when no global seed is set
        shuffled = patches().shuffle(min(SHUFFLE_BUFFER, int(wanted.sum())), seed=seed * 1_000_003 + epoch)
        batches = shuffled.batch(batch_size).map(labelled)
        batches = (batches.take(steps) if steps else batches).enumerate()
        # a stateless seed pair per batch for the augmentation: (seed + epoch, batch number)
        first = tf.constant(seed + epoch, tf.int64)
        return batches.map(lambda number, batch: (batch, tf.stack([first, number])))

    def augmented(batch, pair):
        x, y = batch
        return (augment(x, pair) if augment is not None else x), y

    dataset = one_epoch(epochs[0]).take(0)  # empty when a resumed run has no epoch left
    for epoch in range(*epochs):
        dataset = dataset.concatenate(one_epoch(epoch))
    return dataset.map(augmented, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(count: int, batch_size: int) -> int:
    return -(-count // batch_size)
