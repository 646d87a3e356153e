"""Prediction throughput with and without test-time augmentation: images per second, one table.

    python scripts/bench_predict.py --backbone mobilenet_v1 --images 4096
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v1")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tta", nargs="+", default=["none", "flips", "dihedral8"])
    args = parser.parse_args()

    import keras
    import numpy as np
    from hydra import compose, initialize_config_dir

    from histo_transfer.evaluation.inference import predict_probabilities
    from histo_transfer.models.classifier import build_classifier

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"backbone={args.backbone}", "backbone.weights=null",
                                           f"backbone.input_size={args.input_size}"])
    keras.utils.set_random_seed(0)
    model, _ = build_classifier(cfg.backbone, cfg.head)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 96, 96, 3), dtype=np.uint8)
    rows = []
    for tta in args.tta:
        predict_probabilities(model, images[: args.batch_size], args.batch_size, tta, progress=False)  # trace
        started = time.perf_counter()
        predict_probabilities(model, images, args.batch_size, tta, progress=False)
        rows.append((tta, time.perf_counter() - started))
    print(f"\nPrediction benchmark: {args.backbone} at {args.input_size} px, {args.images} patches, "
          f"batch {args.batch_size}, {os.cpu_count()} CPU cores\n")
    print("| tta | model passes per patch | seconds | patches/s |\n|---|---|---|---|")
    views = {"none": 1, "flips": 4, "dihedral8": 8}
    for tta, seconds in rows:
        print(f"| {tta} | {views[tta]} | {seconds:.2f} | {args.images / seconds:,.0f} |")


if __name__ == "__main__":
    main()
