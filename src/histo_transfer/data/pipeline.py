"""tf.data pipeline over the packed cache (memory-mapped) or an image array in memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from histo_transfer import IMAGE_SHAPE

RECORD_BYTES = int(np.prod(IMAGE_SHAPE))


SHUFFLE_BUFFER = 8192  # patches (about 230 MB): sources pack patches in an order unrelated to their label
READ_CHUNK = 256  # records decoded per step


@dataclass
class ExtraPatches:
    """Patches of another packed set mixed into the training batches (pseudo-labels), with their weight
    in the loss; the main set's patches weigh 1."""

    images: object  # memory-mapped or in memory, as `images` of make_dataset
    labels: np.ndarray  # targets, as `labels` of make_dataset (same columns)
    indices: np.ndarray
    weight: float


def make_dataset(images, labels: np.ndarray, indices: np.ndarray, batch_size: int, *,
                 shuffle: bool = False, augment=None, seed: int = 0, epochs: tuple[int, int] = (0, 1),
                 steps: int | None = None, extra: ExtraPatches | None = None) -> tf.data.Dataset:
    """Batches of (RGB 0-255 uint8 images, float32 (B, 1) labels) of the patches `indices`; `labels` of
    shape (N, k) give (B, k) targets.

    A memory-mapped cache is read by TensorFlow itself, record by record, never through Python: a
    Python step inside tf.data (numpy_function) can deadlock when Keras drops an iterator while that
    step waits for the GIL. Unshuffled batches come in index order. With `shuffle`, the dataset holds
    the epochs `epochs[0]` up to `epochs[1]` back to back (fit with steps_per_epoch); epoch e's order
    and augmentations depend only on (seed, e), so a resumed run sees what it would have seen;
    `steps`: the batches of each epoch, fewer than one pass cutting it short (debug runs), more
    going over the patches again, reshuffled (the same optimizer steps for every data size).
    `extra` (shuffled only): its patches are mixed in, seeded as the order is, and batches become
    (images, targets, sample weights).
    The model casts the uint8 images itself, on its own device.
    """
    count = len(labels)
    targets, weights = np.asarray(labels, np.float32), np.ones(count, np.float32)
    if extra is not None:  # one index space: the extra set's patches follow the main set's
        targets = np.concatenate([targets, np.asarray(extra.labels, np.float32)])
        weights = np.concatenate([weights, np.full(len(extra.labels), extra.weight, np.float32)])
    targets_t, weights_t = tf.constant(targets), tf.constant(weights)
    main = _patches(images, indices, count)
    size = in_main = int(main.cardinality())

    columns = 1 if targets.ndim == 1 else targets.shape[1]

    def labelled(index, image):  # (B, 1); (B, k) for targets of k columns (a label and a teacher's)
        # k known to the graph: a loss tells validation's labels from training's pairs by it
        target = tf.reshape(tf.gather(targets_t, index), (tf.shape(index)[0], columns))
        return (image, target) if extra is None else (image, target, tf.gather(weights_t, index))

    if not shuffle:
        return main.batch(batch_size).map(labelled).prefetch(tf.data.AUTOTUNE)
    if extra is not None:
        added = _patches(extra.images, extra.indices, len(extra.labels)).map(lambda i, image: (i + count, image))
        size += int(added.cardinality())

    def one_epoch(epoch: int) -> tf.data.Dataset:
        # Python-int seeds: TensorFlow's op seeds must not be tensors when no global seed is set
        stream = main
        if size > in_main:  # extra patches kept
            stream = tf.data.Dataset.sample_from_datasets([main, added], weights=[in_main / size, 1 - in_main / size],
                                                          seed=seed * 1_000_003 + epoch + 1,
                                                          stop_on_empty_dataset=False)
            stream = stream.apply(tf.data.experimental.assert_cardinality(size))
        shuffled = stream.shuffle(min(SHUFFLE_BUFFER, size), seed=seed * 1_000_003 + epoch)
        if steps and steps > steps_per_epoch(size, batch_size):
            shuffled = shuffled.repeat()  # each pass in another order, still a function of (seed, epoch)
        batches = shuffled.batch(batch_size).map(labelled)
        batches = (batches.take(steps) if steps else batches).enumerate()
        # a stateless seed pair per batch for the augmentation: (seed + epoch, batch number)
        first = tf.constant(seed + epoch, tf.int64)
        return batches.map(lambda number, batch: (batch, tf.stack([first, number])))

    def augmented(batch, pair):
        x, *rest = batch
        return ((augment(x, pair) if augment is not None else x), *rest)

    dataset = one_epoch(epochs[0]).take(0)  # empty when a resumed run has no epoch left
    for epoch in range(*epochs):
        dataset = dataset.concatenate(one_epoch(epoch))
    return dataset.map(augmented, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _patches(images, indices: np.ndarray, count: int) -> tf.data.Dataset:
    """(index, image) of the patches `indices` of `images` (`count` of them in all), in index order."""
    wanted = np.zeros(count, dtype=bool)
    wanted[np.asarray(indices, dtype=np.int64)] = True
    if isinstance(images, np.memmap):
        wanted_t = tf.constant(wanted)
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


def steps_per_epoch(count: int, batch_size: int) -> int:
    return -(-count // batch_size)
