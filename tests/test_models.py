"""The classifier: input contract, the notebook's head, fine-tuning share, weights policy, precision."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from histo_transfer.config.errors import ConfigError
from histo_transfer.models.classifier import build_classifier
from histo_transfer.training.session import configure_precision

HEAD = OmegaConf.create({"dropout": 0.2, "units": 64, "bn_momentum": 0.99})


def backbone_cfg(**values):
    base = {"name": "tiny_cnn", "weights": None, "fine_tune_fraction": 1.0, "input_size": 96, "width": 4}
    return OmegaConf.create({**base, **values})


@pytest.fixture
def offline(monkeypatch):
    """Make every ImageNet download fail as it does without network, whatever this machine can reach."""
    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- no network")
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", no_network)


def test_raw_rgb_in_float32_probability_out():
    model, backbone = build_classifier(backbone_cfg(), HEAD)
    patches = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    from_uint8 = model.predict(patches, verbose=0)
    from_float = model.predict(patches.astype(np.float32), verbose=0)
    assert from_uint8.shape == (5, 1) and from_uint8.dtype == np.float32
    assert np.allclose(from_uint8, from_float) and ((0 <= from_uint8) & (from_uint8 <= 1)).all()
    assert backbone.weights_source == "random"


def test_head_is_the_notebooks():
    model, _ = build_classifier(backbone_cfg(), HEAD)
    head = model.layers[-8:]
    assert [type(layer).__name__ for layer in head] == [
        "GlobalAveragePooling2D", "Dropout", "Dense", "BatchNormalization", "Dense", "BatchNormalization",
        "Dense", "Activation"]
    assert head[1].rate == 0.2 and head[2].units == 64 and head[6].units == 1
    assert head[-1].dtype_policy.compute_dtype == "float32"


def test_input_size_resizes_inside_the_model():
    model, _ = build_classifier(backbone_cfg(input_size=64), HEAD)
    assert model.input_shape == (None, 96, 96, 3)
    assert any(isinstance(layer, keras.layers.Resizing) for layer in model.layers)
    assert model.predict(np.zeros((2, 96, 96, 3), np.uint8), verbose=0).shape == (2, 1)


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    """A weights file for MobileNet v1 (alpha 0.25), as users pass with backbone.weights=PATH."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v1_025.weights.h5"
    source = keras.applications.MobileNet(input_shape=(96, 96, 3), alpha=0.25, include_top=False, weights=None)
    source.save_weights(path)
    return path, source.layers[1].get_weights()[0]  # and the first conv kernel, to check the load


@pytest.mark.parametrize("fraction", [0.0, 0.1, 1.0])
def test_fine_tune_fraction_unfreezes_the_top_of_a_pretrained_backbone(mobilenet_weights, fraction):
    path, kernel = mobilenet_weights
    cfg = backbone_cfg(name="mobilenet_v1", alpha=0.25, weights=str(path), fine_tune_fraction=fraction)
    _, backbone = build_classifier(cfg, HEAD)
    layers = backbone.model.layers
    flags = [layer.trainable for layer in layers]
    expected = len(layers) - round(len(layers) * (1 - fraction))
    assert sum(flags) == expected
    assert flags == sorted(flags)  # frozen bottom, trainable top
    assert backbone.weights_source == f"file:{path}"
    assert np.array_equal(backbone.model.layers[1].get_weights()[0], kernel)


def test_random_backbone_trains_whole(caplog):
    cfg = backbone_cfg(name="mobilenet_v1", alpha=0.25, weights=None, fine_tune_fraction=0.1)
    with caplog.at_level(logging.WARNING):
        _, backbone = build_classifier(cfg, HEAD)
    assert all(layer.trainable for layer in backbone.model.layers)
    assert "training all its layers" in caplog.text


def test_weights_file_for_another_architecture_is_a_config_error(mobilenet_weights):
    cfg = backbone_cfg(name="mobilenet_v1", alpha=0.5, weights=str(mobilenet_weights[0]))
    with pytest.raises(ConfigError, match="backbone.weights: .* does not fit backbone mobilenet_v1"):
        build_classifier(cfg, HEAD)


def test_imagenet_is_strict_when_the_download_fails(offline):
    with pytest.raises(ConfigError, match="ImageNet weights for mobilenet_v1 could not be loaded .*backbone.weights=auto"):
        build_classifier(backbone_cfg(name="mobilenet_v1", alpha=0.25, weights="imagenet"), HEAD)


def test_auto_falls_back_to_random_init_loudly(offline, caplog):
    with caplog.at_level(logging.WARNING):
        _, backbone = build_classifier(backbone_cfg(name="mobilenet_v1", alpha=0.25, weights="auto"), HEAD)
    assert backbone.weights_source == "random (imagenet unavailable)"
    assert "Training from RANDOM initialisation" in caplog.text


def test_mixed_precision_is_skipped_on_cpu(caplog):
    with caplog.at_level(logging.INFO):
        assert configure_precision(True) == "float32"
    assert "mixed_precision skipped: no GPU" in caplog.text
    assert keras.mixed_precision.global_policy().name == "float32"


def test_mixed_precision_on_a_gpu_trains_in_float16_with_a_float32_output(monkeypatch):
    """The GPU branch, on a CPU: the policy, loss scaling and a real training step in mixed_float16."""
    import tensorflow as tf

    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind))
    try:
        assert configure_precision(True) == "mixed_float16"
        model, _ = build_classifier(backbone_cfg(), HEAD)
        model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(label_smoothing=0.1))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.get_layer(index=-2).compute_dtype == "float16"
        patches = np.random.default_rng(0).integers(0, 256, (8, 96, 96, 3), dtype=np.uint8)
        loss = model.train_on_batch(patches, np.array([[0], [1]] * 4, np.float32))
        assert np.isfinite(loss)
        output = model(patches)
        assert output.dtype == "float32" and ((0 <= output) & (output <= 1)).numpy().all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bench_train_prints_one_row_per_backbone_batch_and_precision():
    result = run_cli(["--backbones", "tiny_cnn", "--batch-sizes", "4,8", "--input-size", "32", "--precisions",
                      "float32,mixed_float16", "--xla", "off", "--steps", "2", "--warmup", "1"],
                     script="scripts/bench_train.py")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| tiny_cnn")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("4", "float32"), ("4", "mixed_float16"), ("8", "float32"), ("8", "mixed_float16")]
    assert all(float(r[4].replace(",", "")) > 0 for r in rows)
