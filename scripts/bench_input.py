"""Input-pipeline benchmark: is a run limited by its input or by compute?

Measures, in one process, on the same data and augmentation, images per second of
  (a) the notebook's loader: ImageDataGenerator.flow_from_dataframe reading TIFFs,
  (b) building the packed cache,
  (c) the tf.data pipeline from the cache (shuffle, batch, augmentation),
  (d) training steps of the chosen backbone on one batch already in memory (pure compute),
  (e) a real training epoch fed by (c), timed alternately with (d) (--repeats of each; the ratio
      is the median over real epochs of each against the compute epochs either side, with a
      bootstrap interval),
  (f) building the packed cache of a class-per-folder JPEG set (data=folders; default
      ../shared/data/pcam_folders when present),
and prints one table, then the CPU time per patch of (c) and of (d), and how many cores the
pipeline needs at compute-only speed against how many the step leaves idle: above that, a real
epoch must slow down; below it, what it loses comes from sharing cores with the step. The source
layout (default: ../shared/data/pcam_sample beside the checkout, else the built-in synthetic data)
is repeated with hard links to --images patches.

    python scripts/bench_input.py --images 20000 --backbone mobilenet_v1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "pcam_sample"
DEFAULT_FOLDERS = ROOT.parent / "shared" / "data" / "pcam_folders"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE if DEFAULT_SOURCE.is_dir() else None,
                        help="Kaggle-layout folder to repeat (default: the pcam sample, else synthetic data)")
    parser.add_argument("--images", type=int, default=20_000, help="patches in the benchmark layout")
    parser.add_argument("--notebook-images", type=int, default=3_000, help="patches read by the notebook loader")
    parser.add_argument("--backbone", default="mobilenet_v1")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--augmentation", default="basic", choices=_augmentations())
    parser.add_argument("--folders", type=lambda value: None if value == "none" else Path(value),
                        default=DEFAULT_FOLDERS if DEFAULT_FOLDERS.is_dir() else None,
                        help="class-per-folder JPEG set for row (f) (default: the PCam folders; none skips it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="(d) and (e) epochs timed, alternately")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        work = Path(tmp)
        source = args.source or _synthetic_source(work)
        layout = replicate(source, work / "layout", args.images)
        rows, ratios, cpu_use = run_benchmarks(layout, work, args)
    print_table(rows, ratios, cpu_use, args)


def _augmentations() -> list[str]:
    from histo_transfer.data.augment import AUGMENTATIONS

    return list(AUGMENTATIONS.names())


def _synthetic_source(work: Path) -> Path:
    from histo_transfer.data.synthetic import ensure_synthetic

    return ensure_synthetic(work / "synthetic", n_train=2000, n_test=0)


def replicate(source: Path, target: Path, count: int) -> Path:
    """A Kaggle layout of `count` patches: the source's files under new ids (hard links, no copies)."""
    import pandas as pd

    labels = pd.read_csv(source / "train_labels.csv", dtype=str)
    (target / "train").mkdir(parents=True)
    rows = []
    for index in range(count):
        original = labels.iloc[index % len(labels)]
        new_id = f"{index:08d}{original.id[8:]}"
        src, dst = source / "train" / f"{original.id}.tif", target / "train" / f"{new_id}.tif"
        try:
            os.link(src, dst)
        except OSError:  # another file system: copy
            shutil.copyfile(src, dst)
        rows.append((new_id, original.label))
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(target / "train_labels.csv", index=False)
    return target


def run_benchmarks(layout: Path, work: Path, args) -> list[tuple[str, int, float, str]]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "data=kaggle", f"data.root={layout}", f"data.cache_dir={work / 'cache'}",
            f"backbone={args.backbone}", "backbone.weights=null", f"backbone.input_size={args.input_size}",
            f"augmentation={args.augmentation}", f"trainer.batch_size={args.batch_size}"])
    rows = [notebook_loader(layout, args)]

    from histo_transfer.data.loading import load_training_data

    started = time.perf_counter()
    data = load_training_data(cfg.data)  # builds the packed cache
    rows.append(("(b) packed cache build (decode TIFFs, all cores)", len(data.labels),
                 time.perf_counter() - started, "once per data version"))

    import keras

    from histo_transfer.data.augment import build_augmentation
    from histo_transfer.data.pipeline import make_dataset
    from histo_transfer.training.session import TrainingSession

    augment = build_augmentation(cfg.augmentation, 0)
    dataset = make_dataset(data.images, data.labels, data.train_indices, args.batch_size,
                           shuffle=True, augment=augment, seed=0)
    next(iter(dataset))  # build the pipeline before timing
    started, cpu_started, seen = time.perf_counter(), time.process_time(), 0
    for images, _ in dataset:
        seen += len(images)
    rows.append(("(c) tf.data from the cache (shuffle, batch, augment)", seen, time.perf_counter() - started,
                 "one pass over the training split"))
    pipeline_cpu = (time.process_time() - cpu_started) / seen

    keras.utils.set_random_seed(0)
    model, _, _ = TrainingSession(cfg, data).build_model()
    compute, real, compute_cpu = compute_and_real_epochs(model, next(iter(dataset)), data, augment, args)
    steps = len(data.train_indices) // args.batch_size
    rows.append(("(d) training steps on an in-memory batch (compute only)", steps * args.batch_size,
                 statistics.median(compute), f"{cfg.backbone.name} at {args.input_size} px; median of {len(compute)} epochs"))
    cpu_use = {"pipeline per patch": pipeline_cpu,  # one fresh pass, as row (c): shuffle-buffer fill included
               "step per patch": statistics.median(compute_cpu) / (steps * args.batch_size),
               "cores busy": statistics.median(cpu / wall for cpu, wall in zip(compute_cpu, compute))}
    rows.append(("(e) real training epoch fed by (c)", steps * args.batch_size, statistics.median(real),
                 f"median of {len(real)} epochs, each between two of (d)"))
    if args.folders is not None:
        rows.append(folders_cache_build(args.folders, work))
    return rows, paired_ratios(compute, real), cpu_use


def paired_ratios(compute: list[float], real: list[float]) -> list[float]:
    """Each real epoch's speed as a share of compute-only speed, against the mean of the two compute
    epochs either side of it: a drift of the machine's speed during the run cancels out."""
    return [(compute[i] + compute[i + 1]) / 2 / seconds for i, seconds in enumerate(real)]


def median_interval(values: list[float], seed: int = 0, samples: int = 2000) -> tuple[float, float]:
    """Percentile 95 % interval of the median over the values resampled with replacement."""
    import numpy as np

    draws = np.random.default_rng(seed).choice(values, size=(samples, len(values)))
    low, high = np.percentile(np.median(draws, axis=1), [2.5, 97.5])
    return float(low), float(high)


def compute_and_real_epochs(model, batch, data, augment, args) -> tuple[list[float], list[float], list[float]]:
    """Seconds of each epoch of pure compute (d) and of each real epoch (e), measured alternately,
    and the process's CPU seconds in each compute epoch.

    One fit runs: a warm-up, then `repeats` times an in-memory epoch and a real one, then one more
    in-memory epoch, so both see the same machine state (on a shared 2-core machine compute-only
    epochs alone vary by 20 %, and one pair of epochs can land the ratio anywhere in that range).
    """
    import tensorflow as tf

    from histo_transfer.data.pipeline import make_dataset

    steps = len(data.train_indices) // args.batch_size
    in_memory = tf.data.Dataset.from_tensors(batch).repeat(steps)
    schedule = in_memory.concatenate(in_memory)  # warm-up: traces the training step
    for epoch in range(args.repeats):
        real = make_dataset(data.images, data.labels, data.train_indices, args.batch_size, shuffle=True,
                            augment=augment, seed=0, epochs=(epoch, epoch + 1)).take(steps)
        schedule = schedule.concatenate(real).concatenate(in_memory)
    timer = epoch_timer()
    model.fit(schedule, steps_per_epoch=steps, epochs=2 + 2 * args.repeats, callbacks=[timer], verbose=0)
    return timer.seconds[1::2], timer.seconds[2::2], timer.cpu_seconds[1::2]


def folders_cache_build(folders: Path, work: Path) -> tuple[str, int, float, str]:
    """Row (f): decode a class-per-folder JPEG set into the packed cache (Pillow, all cores)."""
    from hydra import compose, initialize_config_dir

    from histo_transfer.data.sources import data_source

    val_dir = ["data.val_dir=valid"] if (folders / "valid").is_dir() else []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=folders", f"data.root={folders}", *val_dir,
                                           f"data.cache_dir={work / 'folders-cache'}"])
    started = time.perf_counter()
    patches = data_source(cfg.data).labelled().patches
    return ("(f) packed cache build from JPEG class folders", len(patches.ids), time.perf_counter() - started,
            f"data=folders, {folders.name}")


def notebook_loader(layout: Path, args) -> tuple[str, int, float, str]:
    """The notebook's ImageDataGenerator reading TIFFs, with the closest augmentation it has."""
    import pandas as pd
    import tensorflow as tf

    frame = pd.read_csv(layout / "train_labels.csv", dtype=str).head(args.notebook_images)
    frame["id"] = frame["id"] + ".tif"
    flips = {"horizontal_flip": True, "vertical_flip": True}  # it has no 90-degree turns
    geometric = {**flips, "rotation_range": 20, "width_shift_range": 0.1, "height_shift_range": 0.1, "zoom_range": 0.1}
    colour = {**flips, "brightness_range": (0.9, 1.1), "channel_shift_range": 10.0}  # its nearest to stain jitter
    augmentation = {"none": {}, "basic": flips, "notebook": geometric, "strong": colour, "pathology": colour}
    generator = tf.keras.preprocessing.image.ImageDataGenerator(**augmentation.get(args.augmentation, flips))
    flow = generator.flow_from_dataframe(frame, directory=str(layout / "train"), x_col="id", y_col="label",
                                         target_size=(96, 96), batch_size=args.batch_size, class_mode="binary")
    started, seen = time.perf_counter(), 0
    for _ in range(len(flow)):
        images, _ = next(flow)
        seen += len(images)
    return ("(a) notebook: ImageDataGenerator.flow_from_dataframe", seen, time.perf_counter() - started,
            "reads and decodes every TIFF every epoch")


def epoch_timer():
    """A Keras callback collecting each epoch's wall time in its `seconds` list and the process's CPU
    time in `cpu_seconds`."""
    import keras

    seconds: list[float] = []
    cpu_seconds: list[float] = []
    started = [0.0, 0.0]

    def begin(epoch, logs):
        started[:] = time.perf_counter(), time.process_time()

    def end(epoch, logs):
        seconds.append(time.perf_counter() - started[0])
        cpu_seconds.append(time.process_time() - started[1])

    timer = keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)
    timer.seconds, timer.cpu_seconds = seconds, cpu_seconds
    return timer


def print_table(rows, ratios, cpu_use, args) -> None:
    rates = {row[0][:3]: row[1] / row[2] for row in rows}
    print(f"\nInput benchmark: {args.images} patches, batch {args.batch_size}, augmentation {args.augmentation}, "
          f"{os.cpu_count()} CPU cores\n")
    print(f"| {'stage':<56} | {'images':>7} | {'seconds':>8} | {'images/s':>9} | note")
    print(f"|{'-' * 58}|{'-' * 9}|{'-' * 10}|{'-' * 11}|------")
    for stage, images, seconds, note in rows:
        print(f"| {stage:<56} | {images:>7} | {seconds:>8.2f} | {images / seconds:>9,.0f} | {note}")
    if "(f)" in rates:
        print(f"\nJPEG class folders: cache build {rates['(f)']:,.0f} images/s (target >= 3,000)")
    print(f"\nreal epoch / compute only, each real epoch against the compute epochs either side: "
          f"{', '.join(f'{ratio:.0%}' for ratio in ratios)}")
    pipeline, step = cpu_use["pipeline per patch"], cpu_use["step per patch"]
    idle = os.cpu_count() - cpu_use["cores busy"]
    print(f"\nCPU time per patch: pipeline (c) {pipeline * 1e6:,.0f} µs, training step (d) {step * 1e6:,.0f} µs "
          f"(the pipeline {pipeline / step:.1%} of the step); compute only leaves {idle:.2f} of {os.cpu_count()} "
          f"cores idle, and at its speed the pipeline needs {pipeline * rates['(d)']:.2f} cores")
    low, high = median_interval(ratios)
    print(f"\ncache build {rates['(b)']:,.0f} images/s (target >= 3,000); "
          f"pipeline / notebook loader = {rates['(c)'] / rates['(a)']:.0f}x (target >= 20x); "
          f"real epoch / compute only = {statistics.median(ratios):.0%}, median of those "
          f"(95 % interval {low:.0%}-{high:.0%}; target >= 90%)")


if __name__ == "__main__":
    main()
