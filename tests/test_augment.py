"""Batch augmentations and the tf.data pipeline."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from histo_transfer.data.augment import build_augmentation, random_dihedral
from histo_transfer.data.pipeline import make_dataset


def _batch(n=16):
    return tf.constant(np.random.default_rng(1).integers(0, 256, (n, 96, 96, 3)).astype(np.float32))


def _dihedral_images(image):
    views = []
    for candidate in (image, image.transpose(1, 0, 2)):
        for rows in (False, True):
            for cols in (False, True):
                view = candidate[::-1] if rows else candidate
                views.append(view[:, ::-1] if cols else view)
    return views


def test_dihedral_returns_one_of_eight_views_per_image_and_is_seeded():
    images = tf.cast(_batch(64), tf.uint8)
    out = random_dihedral(images, tf.constant([3, 4], tf.int64)).numpy()
    assert out.dtype == np.uint8
    drawn = set()
    for original, augmented in zip(images.numpy(), out):
        matches = [i for i, view in enumerate(_dihedral_images(original)) if np.array_equal(augmented, view)]
        assert matches
        drawn.add(matches[0])
    assert len(drawn) == 8  # every view occurs in a batch of 64
    assert not np.array_equal(out, images.numpy())
    again = random_dihedral(images, tf.constant([3, 4], tf.int64)).numpy()
    assert np.array_equal(out, again)


@pytest.mark.parametrize("name", ["notebook", "strong", "pathology"])
def test_augmentations_keep_shape_and_range_and_change_pixels(name):
    cfg = OmegaConf.load(f"conf/augmentation/{name}.yaml")
    augment = build_augmentation(cfg, seed=0)
    images = _batch()
    out = augment(images, tf.constant([1, 2], tf.int64)).numpy()
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert np.abs(out - images.numpy()).mean() > 1


def test_strong_changes_colour_not_only_geometry():
    cfg = OmegaConf.load("conf/augmentation/strong.yaml")
    images = _batch()
    out = build_augmentation(cfg, seed=0)(images, tf.constant([1, 2], tf.int64)).numpy()
    # geometry alone keeps each image's per-channel mean; stain and brightness jitter do not
    drift = np.abs(out.mean(axis=(1, 2)) - images.numpy().mean(axis=(1, 2)))
    assert drift.max() > 2


@pytest.mark.parametrize("name", ["notebook", "strong", "pathology"])
def test_augmentations_are_seeded_and_differ_between_batches(name):
    augment = build_augmentation(OmegaConf.load(f"conf/augmentation/{name}.yaml"), seed=0)
    images = _batch()
    first = augment(images, tf.constant([1, 2], tf.int64)).numpy()
    assert np.array_equal(first, augment(images, tf.constant([1, 2], tf.int64)).numpy())
    assert not np.array_equal(first, augment(images, tf.constant([1, 3], tf.int64)).numpy())


def test_notebook_with_nothing_to_do_but_flips_only_flips():
    cfg = OmegaConf.create({"name": "notebook", "rotation_degrees": 0, "shift": 0, "zoom": 0})
    images = _batch(32)
    out = build_augmentation(cfg, seed=0)(images, tf.constant([5, 6], tf.int64)).numpy()
    for original, augmented in zip(images.numpy(), out):
        flips = [original, original[::-1], original[:, ::-1], original[::-1, ::-1]]
        assert any(np.allclose(augmented, view, atol=1e-3) for view in flips)


def test_pathology_recompresses_as_jpeg_and_adds_blur_and_noise():
    from histo_transfer.data.augment import _jpeg_recompress

    smooth = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (96, 1, 3))[None].repeat(4, 0)
    out = _jpeg_recompress(tf.constant(smooth), tf.constant([1, 2], tf.int64), 1.0, 5, 5).numpy()
    assert np.abs(out.astype(np.float32) - smooth).mean() > 1  # quality 5: visible loss
    half = _jpeg_recompress(tf.constant(smooth.repeat(16, 0)), tf.constant([1, 2], tf.int64), 0.5, 5, 5).numpy()
    recoded = [not np.array_equal(image, smooth[0]) for image in half]
    assert 10 <= sum(recoded) <= 54  # about half of 64; the rest untouched
    assert all(np.array_equal(image, out[0]) for image, changed in zip(half, recoded) if changed)
    kept = _jpeg_recompress(tf.constant(smooth), tf.constant([1, 2], tf.int64), 0.0, 5, 5).numpy()
    assert np.array_equal(kept, smooth)  # probability 0: untouched
    cfg = OmegaConf.load("conf/augmentation/pathology.yaml")
    images = _batch()
    out = build_augmentation(cfg, seed=0)(images, tf.constant([1, 2], tf.int64)).numpy()
    assert out.dtype == np.uint8  # rounded, as the JPEG codec leaves it
    drift = np.abs(out.mean(axis=(1, 2)) - images.numpy().mean(axis=(1, 2)))
    assert drift.max() > 2  # colour, not only geometry


def test_notebook_resampling_equals_tensorflows_projective_transform():
    """The fused resampling against ImageProjectiveTransformV3 (bilinear, nearest fill) on random
    rotations, zooms, shifts and flips, including points far outside the patch."""
    from histo_transfer.data.augment import _affine_bilinear

    rng = np.random.default_rng(0)
    images = tf.cast(_batch(32), tf.uint8)
    angle, zoom = rng.uniform(-np.pi, np.pi, 32), rng.uniform(0.5, 1.5, 32)
    flips = np.where(rng.uniform(size=(2, 32)) < 0.5, -1.0, 1.0)
    a00, a01 = np.cos(angle) * zoom * flips[0], -np.sin(angle) * zoom * flips[1]
    a10, a11 = np.sin(angle) * zoom * flips[0], np.cos(angle) * zoom * flips[1]
    b0, b1 = rng.uniform(-40, 80, (2, 32))
    transforms = np.stack([a00, a01, b0, a10, a11, b1], axis=1).astype(np.float32)
    expected = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=np.pad(transforms, [(0, 0), (0, 2)]), output_shape=[96, 96],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST").numpy()
    assert np.abs(_affine_bilinear(images, tf.constant(transforms)).numpy() - expected).max() < 0.01


def test_folded_stain_jitter_equals_the_step_by_step_definition():
    """Optical density -> stains -> scale and shift -> RGB, each step on every pixel (the reference)."""
    from histo_transfer.data.augment import _HED_FROM_RGB, _RGB_FROM_HED, stain_jitter

    images = tf.cast(_batch(8), tf.uint8)
    pair, sigma = tf.constant([3, 4], tf.int64), 0.2
    scale = tf.random.stateless_uniform([8, 1, 1, 3], seed=pair, minval=1 - sigma, maxval=1 + sigma).numpy()
    shift = tf.random.stateless_uniform([8, 1, 1, 3], seed=pair + 7, minval=-sigma, maxval=sigma).numpy()
    density = -np.log(np.maximum(images.numpy().astype(np.float64), 1) / 255)
    stains = density @ _HED_FROM_RGB * scale + shift
    expected = np.clip(255 * np.exp(-(stains @ _RGB_FROM_HED)), 0, 255)
    assert np.abs(stain_jitter(images, pair, sigma).numpy() - expected).max() < 0.01
    assert np.abs(expected - images.numpy()).mean() > 1  # and it did jitter


def test_pathology_with_every_strength_zero_only_turns_and_flips():
    """Exercises the colour paths (stain matrix, YIQ hue and saturation matrix) at their identity."""
    cfg = OmegaConf.load("conf/augmentation/pathology.yaml")
    cfg.update(stain_sigma=0.0, hue=0.0, saturation=0.0, blur_probability=0.0, noise_std=0.0, jpeg_probability=0.0)
    images = tf.cast(tf.maximum(_batch(8), 1.0), tf.uint8)  # 0 has no optical density: the stain step lifts it to 1
    out = build_augmentation(cfg, seed=0)(images, tf.constant([5, 6], tf.int64)).numpy()
    for original, augmented in zip(images.numpy(), out):
        assert any(np.array_equal(augmented, view) for view in _dihedral_images(original))


def test_pathology_hue_and_saturation_keep_luma_and_scale_chroma_per_patch():
    """Hue turns and saturation scales each patch's (I, Q) plane and leaves luma (Y) alone; compared
    as sorted pixel values per patch, since the patch also took one of the 8 views."""
    from histo_transfer.data.augment import _YIQ_FROM_RGB

    cfg = OmegaConf.load("conf/augmentation/pathology.yaml")
    cfg.update(stain_sigma=0.0, hue=0.2, saturation=0.5, blur_probability=0.0, noise_std=0.0, jpeg_probability=0.0)
    images = np.random.default_rng(3).integers(90, 166, (8, 96, 96, 3)).astype(np.uint8)  # no clipping at 0 or 255
    out = build_augmentation(cfg, seed=0)(tf.constant(images), tf.constant([5, 6], tf.int64)).numpy()
    before, after = images.astype(np.float64) @ _YIQ_FROM_RGB.T, out.astype(np.float64) @ _YIQ_FROM_RGB.T
    luma = np.sort(before[..., 0].reshape(8, -1), axis=1), np.sort(after[..., 0].reshape(8, -1), axis=1)
    assert np.abs(luma[0] - luma[1]).max() < 1.0  # rounding to uint8 only
    chroma = [np.sort(np.hypot(yiq[..., 1], yiq[..., 2]).reshape(8, -1), axis=1) for yiq in (before, after)]
    ratio = chroma[1].mean(axis=1) / chroma[0].mean(axis=1)
    assert ((ratio > 0.5 - 0.02) & (ratio < 1.5 + 0.02)).all() and ratio.std() > 0.05  # one factor per patch
    angle = [np.arctan2(yiq[..., 2], yiq[..., 1]).mean(axis=(1, 2)) for yiq in (before, after)]
    turned = angle[1] - angle[0]
    assert np.abs(turned).max() > 0.1  # and the hue moved


def test_pathology_blurs_the_chosen_share_only():
    from histo_transfer.data.augment import _blur_choice, _blur_some, _gaussian_kernel

    images = _batch(64)
    chosen, strength = _blur_choice(64, tf.constant([1, 2], tf.int64), 0.3)
    assert len(set(chosen.numpy())) == 19  # round(0.3 * 64), drawn at random
    assert not np.array_equal(np.sort(chosen.numpy()), np.arange(19))
    kernel = _gaussian_kernel(1.0)
    out = tf.function(_blur_some, jit_compile=True)(images, chosen, strength, tf.constant(kernel)).numpy()
    changed = np.abs(out - images.numpy()).max(axis=(1, 2, 3)) > 1e-3
    assert set(np.flatnonzero(changed)) == set(chosen.numpy())  # the others untouched
    # each chosen one blended by its strength with a zero-padded separable Gaussian blur
    depthwise = np.repeat(kernel[:, None, None], 3, axis=1)
    some = tf.gather(images, chosen)
    blurred = tf.nn.depthwise_conv2d(some, depthwise[:, None], strides=[1, 1, 1, 1], padding="SAME")
    blurred = tf.nn.depthwise_conv2d(blurred, depthwise[None], strides=[1, 1, 1, 1], padding="SAME").numpy()
    expected = some.numpy() + strength.numpy()[:, None, None, None] * (blurred - some.numpy())
    assert np.abs(out[chosen.numpy()] - expected).max() < 0.01


def test_none_is_no_augmentation():
    assert build_augmentation(OmegaConf.create({"name": "none"}), seed=0) is None


def test_pipeline_batches_keep_images_and_labels_together():
    n = 50
    images = np.zeros((n, 96, 96, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # each image carries its own index
    labels = (np.arange(n) % 2).astype(np.int8)
    indices = np.arange(10, 50)
    batches = list(make_dataset(images, labels, indices, 16, shuffle=True, seed=0))
    assert [len(x) for x, _ in batches] == [16, 16, 8]
    seen = []
    for x, y in batches:
        assert x.dtype == tf.uint8 and y.dtype == tf.float32 and y.shape[1:] == (1,)
        index = x.numpy()[:, 0, 0, 0].astype(int)
        assert (y.numpy()[:, 0] == index % 2).all()
        seen += index.tolist()
    assert sorted(seen) == indices.tolist() and seen != indices.tolist()  # all of them, shuffled


def test_an_epoch_of_more_steps_than_one_pass_goes_over_the_patches_again_reshuffled():
    """trainer.steps_per_epoch above one pass: the same optimizer steps for every data size (an honest
    learning curve), each pass in another order, every epoch a function of (seed, epoch)."""
    n = 40
    images = np.zeros((n, 96, 96, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)

    def epochs(first, last):
        batches = make_dataset(images, np.zeros(n, np.int8), np.arange(n), 8, shuffle=True, seed=5,
                               epochs=(first, last), steps=12)
        return [x.numpy()[:, 0, 0, 0].astype(int) for x, _ in batches]
    both = epochs(0, 2)
    assert len(both) == 24 and all(len(batch) == 8 for batch in both)  # 12 full batches an epoch
    first = np.concatenate(both[:12])
    assert sorted(first[:40]) == list(range(n)) and sorted(first[40:80]) == list(range(n))  # whole passes
    assert not np.array_equal(first[:40], first[40:80])  # the second pass reshuffled
    assert all(np.array_equal(a, b) for a, b in zip(both[12:], epochs(1, 2)))  # epoch 1 alone, as a resume sees it


@pytest.mark.parametrize("name", ["basic", "notebook", "pathology"])
def test_compiled_augmentations_run_inside_the_pipeline_and_repeat_with_the_seed(name):
    """Inside tf.data the batch size is unknown when the XLA functions are traced and the last batch
    is smaller: each shape compiles, and the same seed gives the same epoch."""
    images = np.random.default_rng(2).integers(0, 256, (40, 96, 96, 3)).astype(np.uint8)
    augment = build_augmentation(OmegaConf.load(f"conf/augmentation/{name}.yaml"), seed=0)

    def epoch():
        return [x.numpy() for x, _ in make_dataset(images, np.zeros(40, np.int8), np.arange(40), 16, shuffle=True,
                                                   augment=augment, seed=3)]
    first = epoch()
    assert [len(x) for x in first] == [16, 16, 8]
    assert all(x.shape[1:] == (96, 96, 3) and x.min() >= 0 and x.max() <= 255 for x in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, epoch()))


def test_bench_input_times_compute_and_real_epochs_alternately(tmp_path):
    from conftest import run_cli, write_kaggle_layout

    source = tmp_path / "source"
    write_kaggle_layout(source, [0, 1] * 40)
    result = run_cli(["--source", str(source), "--images", "320", "--notebook-images", "64", "--backbone", "tiny_cnn",
                      "--input-size", "32", "--batch-size", "16", "--augmentation", "notebook", "--repeats", "2",
                      "--folders", "none"], script="scripts/bench_input.py")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip()[:3]: [cell.strip() for cell in line.split("|")[2:]]
            for line in result.stdout.splitlines() if line.startswith("| (")}
    assert sorted(rows) == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert all(float(row[2].replace(",", "")) > 0 for row in rows.values())  # images/s
    assert rows["(b)"][0] == "320" and rows["(d)"][0] == rows["(e)"][0] == str(256 // 16 * 16)  # whole batches
    assert "median of 3 epochs" in rows["(d)"][3] and "median of 2 epochs" in rows["(e)"][3]
    paired = result.stdout.split("compute epochs either side: ")[1].splitlines()[0]
    ratios = [int(value.rstrip("%")) for value in paired.split(", ")]
    headline = int(result.stdout.split("real epoch / compute only = ")[1].split("%")[0])
    assert len(ratios) == 2 and abs(headline - statistics.median(ratios)) <= 1  # the median of one per real epoch (rounded)
    low, high = (int(value.rstrip("%")) for value in result.stdout.split("95 % interval ")[1].split(";")[0].split("-"))
    assert min(ratios) - 1 <= low <= headline <= high <= max(ratios) + 1  # resampled medians lie within the epochs'
    cpu = result.stdout.split("CPU time per patch: ")[1].splitlines()[0]
    pipeline_us, step_us = (float(part.split(" µs")[0].rsplit(" ", 1)[1].replace(",", ""))
                            for part in cpu.split(", ")[:2])
    share = float(cpu.split(" µs (the pipeline ")[1].split("%")[0]) / 100
    assert pipeline_us > 0 and step_us > 0  # both printed rounded to whole µs:
    assert abs(share - pipeline_us / step_us) <= share * (0.5 / pipeline_us + 0.5 / step_us) + 0.001
    needed = float(cpu.split("the pipeline needs ")[1].split(" cores")[0])
    compute_rate = float(rows["(d)"][2].replace(",", ""))
    assert abs(needed - pipeline_us * 1e-6 * compute_rate) <= 0.01 + needed * 0.5 / pipeline_us


def test_a_memory_mapped_cache_gives_datasets_of_known_length_that_fit_without_running_out(tmp_path):
    """Keras warns "Your input ran out of data" at the end of every epoch and evaluation of a dataset
    whose length it does not know: reading the packed cache record by record must say its length."""
    import warnings

    import keras

    images = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(45, 96, 96, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    labels = (np.arange(45) % 2).astype(np.int8)
    train, val = np.arange(0, 45, 3), np.arange(1, 45, 3)  # 15 patches each
    train_ds = make_dataset(images, labels, train, 4, shuffle=True, epochs=(0, 2))
    val_ds = make_dataset(images, labels, val, 4)
    assert int(val_ds.cardinality()) == 4 and int(train_ds.cardinality()) == 8  # 4 batches per epoch
    model = keras.Sequential([keras.Input((96, 96, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(loss="binary_crossentropy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(train_ds, validation_data=val_ds, epochs=2, steps_per_epoch=4, verbose=0)
        model.evaluate(val_ds, verbose=0)
    assert not [w for w in caught if "ran out of data" in str(w.message)]
