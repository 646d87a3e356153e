"""Whole-slide scoring throughput: tiles per second end to end (reading with tissue detection done,
scoring overlapped) against the model alone on the same tiles already in memory; one table.

    python scripts/bench_slide.py                                   # a synthetic 8192x6144 slide at PCam's 0.972 um/px
    python scripts/bench_slide.py --slide scan.svs --backbone mobilenetv2 --workers 4

"model busy" is model-only seconds over end-to-end seconds: the share of the time the model works,
that reading and tissue detection leave it (tissue detection is a fixed cost per slide: the share
grows with the slide). The end-to-end time includes tracing the model's step, as a real run's does. The model is built from random weights: speed
does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, help="a slide OpenSlide reads (default: a synthetic one)")
    parser.add_argument("--size", default="8192x6144", help="the synthetic slide's level-0 WIDTHxHEIGHT")
    parser.add_argument("--backbone", default="mobilenet_v1")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--tta", default="none")
    parser.add_argument("--mpp-override", type=float)
    args = parser.parse_args()

    from histo_transfer.tasks.console import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras
    import numpy as np
    from hydra import compose, initialize_config_dir

    from histo_transfer.data.slides.batches import read_tiles
    from histo_transfer.data.slides.synthetic import write_synthetic_slide
    from histo_transfer.evaluation.inference import predict_probabilities, scoring_step
    from histo_transfer.models.classifier import build_classifier
    from histo_transfer.workflows.slide_scoring import prepare_slide, score_tiles

    overrides = [f"slide.batch_size={args.batch_size}", f"slide.workers={args.workers}", f"slide.stride={args.stride}",
                 f"tta={args.tta}", f"slide.mpp_override={args.mpp_override or 'null'}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("predict_slide", overrides=overrides)
        model_cfg = compose("config", overrides=[f"backbone={args.backbone}", "backbone.weights=null"])
    keras.utils.set_random_seed(0)
    model, _ = build_classifier(model_cfg.backbone, model_cfg.head)

    with tempfile.TemporaryDirectory(prefix="bench-slide-") as tmp:
        path = args.slide
        if path is None:
            width, height = (int(side) for side in args.size.split("x"))
            path = write_synthetic_slide(Path(tmp) / "synthetic.tif", (width, height), mpp=cfg.slide.mpp,
                                         tissue=(width // 8, height // 8, width * 3 // 4, height * 3 // 4),
                                         tumour=(width * 3 // 8, height * 3 // 8, width // 4, height // 4),
                                         levels=5).path
        started = time.perf_counter()
        with prepare_slide(Path(path), cfg.slide) as prepared:
            tissue_s = time.perf_counter() - started
            slide, plan, tiles = prepared.slide, prepared.plan, prepared.tiles

            started = time.perf_counter()
            images = np.concatenate([batch.images for batch in read_tiles(slide, plan, tiles, args.batch_size,
                                                                          args.workers)])
            read_s = time.perf_counter() - started

            step = scoring_step(model, args.tta)
            predict_probabilities(model, images[:args.batch_size], args.batch_size, args.tta, progress=False, step=step)
            started = time.perf_counter()
            predict_probabilities(model, images, args.batch_size, args.tta, progress=False, step=step)
            model_s = time.perf_counter() - started

            started = time.perf_counter()
            score_tiles([model], read_tiles(slide, plan, tiles, args.batch_size, args.workers), len(tiles), cfg,
                        Path(path).name)
            end_to_end_s = time.perf_counter() - started + tissue_s

    count = len(images)
    print(f"\nSlide benchmark: {Path(path).name} {slide.dimensions[0]}x{slide.dimensions[1]} px at {slide.mpp:.3f} um/px "
          f"(level {plan.level}, scale {plan.scale:.3f}), {count:,} tissue tiles (stride {args.stride}), "
          f"{args.backbone} tta={args.tta}, batch {args.batch_size}, {args.workers} reader threads, "
          f"{os.cpu_count()} CPU cores\n")
    print("| stage | seconds | tiles/s |\n|---|---|---|")
    print(f"| tissue detection (thumbnail, mask, tile choice) | {tissue_s:.2f} | |")
    print(f"| reading alone | {read_s:.2f} | {count / read_s:,.0f} |")
    print(f"| model alone (tiles in memory) | {model_s:.2f} | {count / model_s:,.0f} |")
    print(f"| end to end (tissue detection + reading overlapped with scoring) | {end_to_end_s:.2f} | "
          f"{count / end_to_end_s:,.0f} |")
    print(f"\nmodel busy: {model_s / end_to_end_s:.0%} of the end-to-end time, "
          f"{model_s / (end_to_end_s - tissue_s):.0%} once the tissue is found")


if __name__ == "__main__":
    main()
