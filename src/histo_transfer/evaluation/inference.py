"""Batched prediction with test-time augmentation, and Kaggle submission writing and checking."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from histo_transfer.config.errors import UserError
from histo_transfer.config.options import Options

TTA = Options("tta")  # test-time augmentation: the views of a batch whose probabilities are averaged


class SubmissionError(UserError):
    """A submission that Kaggle would reject or score wrongly."""


@TTA.register("none")
def no_tta(images) -> list:
    return [images]


@TTA.register("flips")
def flips(images) -> list:
    """Identity, left-right, up-down, both."""
    import tensorflow as tf

    return [images, tf.reverse(images, [2]), tf.reverse(images, [1]), tf.reverse(images, [1, 2])]


@TTA.register("dihedral8")
def dihedral8(images) -> list:
    """The 4 rotations, each also mirrored."""
    import tensorflow as tf

    # tf.image.rot90 would check the shape with an Assert, which Grappler warns about at every trace
    transposed = tf.transpose(images, [0, 2, 1, 3])
    rotations = [images, tf.reverse(transposed, [1]), tf.reverse(images, [1, 2]), tf.reverse(transposed, [2])]
    return rotations + [tf.reverse(view, [2]) for view in rotations]


COMBINE = Options("ensemble.method")  # how an ensemble's members' probabilities become one


@COMBINE.register("mean")
def mean_probability(each: np.ndarray) -> np.ndarray:
    return each.mean(axis=0)


@COMBINE.register("rank")
def mean_rank(each: np.ndarray) -> np.ndarray:
    """Mean of each member's ranks scaled to [0, 1]: members with differently calibrated outputs weigh
    alike. Only the order is meaningful (fine for AUC), not the values as probabilities."""
    from scipy.stats import rankdata

    ranks = rankdata(each, axis=1)
    return ((ranks - 1) / max(each.shape[1] - 1, 1)).mean(axis=0).astype(np.float32)


def ensemble_probabilities(models: list, images, batch_size: int = 256, tta: str = "none",
                           method: str = "mean") -> np.ndarray:
    """Each member's probabilities after its TTA, combined by `method`; one member: its own."""
    each = np.stack([predict_probabilities(model, images, batch_size, tta) for model in models])
    return each[0] if len(each) == 1 else COMBINE[method](each).astype(np.float32)


def predict_probabilities(model, images, batch_size: int = 256, tta: str = "none", progress: bool = True,
                          step=None) -> np.ndarray:
    """Probability of label 1 for every patch of `images` (array-like, e.g. the memory-mapped cache),
    averaged over the TTA views, as float32 of shape (N,). `step`: a `scoring_step(model, tta)` kept
    by a caller that scores many arrays with one model (a slide's chunks), so it is traced once."""
    import tensorflow as tf
    from tqdm import tqdm

    step = step or scoring_step(model, tta)
    out = np.empty(len(images), dtype=np.float32)
    with tqdm(total=len(images), desc=f"predicting (tta={tta})", unit="img", disable=None if progress else True) as bar:
        for start in range(0, len(images), batch_size):
            # float32 before the TTA views (the model takes float32 anyway): oneDNN has no uint8 transpose
            # without AVX-512, and says so on the console; a cast inside the step would be moved after it
            batch = np.asarray(images[start:start + batch_size], dtype=np.float32)
            out[start:start + len(batch)] = step(tf.constant(batch)).numpy()
            bar.update(len(batch))
    return out


def scoring_step(model, tta: str = "none"):
    """The compiled step that maps a batch of patches to their probabilities, averaged over the TTA views."""
    import tensorflow as tf

    # a partial, not a closure: TensorFlow counts traces per function code, so the members of an
    # ensemble (one trace each, and one for a smaller last batch) would add up to its "frequent
    # retracing" warning, about traces that are all needed
    return tf.function(functools.partial(_views_mean, model, TTA[tta]), reduce_retracing=True)


def _views_mean(model, views, batch):
    import tensorflow as tf

    batches = views(batch)
    stacked = tf.concat(batches, axis=0)
    probabilities = tf.cast(model(stacked, training=False), tf.float32)
    return tf.reduce_mean(tf.reshape(probabilities, [len(batches), -1]), axis=0)


def submission_frame(ids, probabilities, expected_ids=None) -> pd.DataFrame:
    """`id,label` rows (label = probability of 1), in the order of `expected_ids` when given
    (sample_submission.csv), after checking that every expected id is there exactly once."""
    frame = pd.DataFrame({"id": np.asarray(ids, dtype=str), "label": np.asarray(probabilities, dtype=np.float64)})
    check_submission(frame, expected_ids if expected_ids is not None else frame["id"])
    if expected_ids is not None:
        frame = frame.set_index("id").loc[list(expected_ids)].reset_index()
    return frame


def check_submission(frame: pd.DataFrame, expected_ids) -> None:
    """Every expected id exactly once, nothing else, probabilities in [0, 1] and no NaN."""
    if list(frame.columns) != ["id", "label"]:
        raise SubmissionError(f"submission columns are {','.join(map(str, frame.columns))}; expected id,label")
    ids = frame["id"].astype(str)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise SubmissionError(f"submission has id {duplicated.iloc[0]} more than once ({len(duplicated)} duplicates)")
    expected = pd.Index(pd.Series(list(expected_ids), dtype=str))
    missing, extra = expected.difference(ids), pd.Index(ids).difference(expected)
    if len(missing):
        raise SubmissionError(f"submission lacks id {missing[0]} ({len(missing)} missing of {len(expected)})")
    if len(extra):
        raise SubmissionError(f"submission has id {extra[0]} that is not a test patch ({len(extra)} extra)")
    labels = frame["label"]
    if labels.isna().any():
        raise SubmissionError(f"submission label of id {ids[labels.isna()].iloc[0]} is NaN")
    outside = labels[(labels < 0) | (labels > 1)]
    if len(outside):
        raise SubmissionError(f"submission label {outside.iloc[0]} of id {ids[outside.index[0]]} is outside [0, 1]")


def write_submission(frame: pd.DataFrame, path: Path) -> Path:
    """Written whole or not at all: a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    frame.to_csv(partial, index=False)
    partial.replace(path)
    return path
