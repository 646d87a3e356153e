"""Training throughput per backbone, batch size and precision (and XLA), one table: the figures a GPU
machine needs to choose a recipe, measured the same way on any machine.

Each row builds the project's classifier (random weights: throughput does not depend on them),
compiles it as training does, and times training steps on one batch held on the device, after
warm-up steps that trace and compile it. mixed_float16 is forced even on a CPU, where it is slow.

    python scripts/bench_train.py --backbones mobilenet_v1,mobilenetv2,resnet152v2 --batch-sizes 64,256
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="mobilenet_v1,mobilenetv2")
    parser.add_argument("--batch-sizes", default="64")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--precisions", default="float32,mixed_float16")
    parser.add_argument("--xla", default="off,on")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf

    device = ", ".join(d.name for d in tf.config.list_logical_devices("GPU")) or f"CPU ({os.cpu_count()} cores)"
    print(f"\nTraining throughput on {device}, {args.input_size} px, steps on one batch held on the device\n")
    print("| backbone | batch | precision | XLA | images/s | ms/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    grid = itertools.product(args.backbones.split(","), map(int, args.batch_sizes.split(",")),
                             args.precisions.split(","), args.xla.split(","))
    for backbone, batch, precision, xla in grid:
        seconds = time_steps(backbone, batch, precision, xla == "on", args)
        print(f"| {backbone} | {batch} | {precision} | {xla} | {batch * args.steps / seconds:,.0f} | "
              f"{1000 * seconds / args.steps:.0f} |", flush=True)


def time_steps(backbone: str, batch: int, precision: str, xla: bool, args) -> float:
    import keras
    import numpy as np
    import tensorflow as tf
    from hydra import compose, initialize_config_dir

    from histo_transfer.models.classifier import build_classifier

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"backbone={backbone}", "backbone.weights=null",
                                           f"backbone.input_size={args.input_size}"])
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model, _ = build_classifier(cfg.backbone, cfg.head)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla,
                      loss=keras.losses.BinaryCrossentropy(label_smoothing=0.1))
        rng = np.random.default_rng(0)
        images = tf.constant(rng.integers(0, 256, (batch, 96, 96, 3), dtype=np.uint8))
        labels = tf.constant(rng.integers(0, 2, (batch, 1)).astype(np.float32))
        for _ in range(args.warmup):
            model.train_on_batch(images, labels)
        started = time.perf_counter()
        for _ in range(args.steps):
            loss = model.train_on_batch(images, labels)
        float(loss)  # wait for the device
        return time.perf_counter() - started
    finally:
        keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    main()
