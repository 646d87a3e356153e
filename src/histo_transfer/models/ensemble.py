"""An ensemble (and its test-time augmentation) as ONE self-contained Keras model: raw 0-255 patches
in, the mean probability of its members over the views out.

Built from Keras' own layers only, so the saved file loads with plain `keras.models.load_model` in
safe mode, without this project. A flip is a fixed exchange matrix applied by a frozen Dense layer
along the flipped axis (exact for 0-255 values); a transpose is a Permute. The 8 dihedral views
{transpose or not} x {flips} are the 4 rotations with their mirror images, as inference.py's TTA.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from histo_transfer import IMAGE_SHAPE

VIEWS = {"none": ((False, False, False),),
         "flips": tuple((False, h, w) for h in (False, True) for w in (False, True)),
         "dihedral8": tuple((t, h, w) for t in (False, True) for h in (False, True) for w in (False, True))}


def export_ensemble(members: list, tta: str = "none", name: str = "ensemble") -> keras.Model:
    """One model averaging `members` (Keras models, raw patches in, (N, 1) out) over the `tta` views."""
    inputs = keras.Input(IMAGE_SHAPE, name="rgb")
    x = layers.Activation("linear", dtype="float32", name="as_float")(inputs)  # uint8 patches become float32
    flip_h, flip_w = _flip(IMAGE_SHAPE[0], axis=1, name="flip_rows"), _flip(IMAGE_SHAPE[1], axis=2, name="flip_cols")
    transpose = layers.Permute((2, 1, 3), name="transpose")
    views = []
    for transposed, rows, cols in VIEWS[tta]:
        view = transpose(x) if transposed else x
        view = flip_h(view) if rows else view
        views.append(flip_w(view) if cols else view)
    wrapped = [keras.Model(m.input, m.output, name=f"member_{i}") for i, m in enumerate(members)]
    outputs = [member(view) for member in wrapped for view in views]
    probability = outputs[0] if len(outputs) == 1 else layers.Average(name="mean", dtype="float32")(outputs)
    return keras.Model(inputs, probability, name=name)


def _flip(size: int, axis: int, name: str):
    """Reverse image axis 1 (rows) or 2 (columns) with a frozen exchange matrix."""
    order = (3, 2, 1) if axis == 1 else (1, 3, 2)  # bring the axis last, and back
    dense = layers.Dense(size, use_bias=False, trainable=False, name=f"{name}_exchange",
                         kernel_initializer=keras.initializers.Constant(np.eye(size, dtype="float32")[::-1]))
    before, after = layers.Permute(order, name=f"{name}_in"), layers.Permute(order, name=f"{name}_out")
    return lambda tensor: after(dense(before(tensor)))
