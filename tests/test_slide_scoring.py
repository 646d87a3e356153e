"""predict_slide.py: a whole-slide image scored by a trained model in one tracked run (probability map,
overlay, tiles.csv, GeoJSON regions, slide metrics), a folder of slides under one parent, and each
bad input as one line with exit status 2.

The model is a tiny CNN trained once for the module, through train.py, on patches cut from a slide
of the same synthetic texture as the slides it then scores (another seed, so other pixels): PCam
patches are too hard for a model trained in seconds, and the tests check the plumbing from slide to
regions, not a model's quality.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import CONF_DIR, TINY_MODEL, run_cli, store_overrides
from matplotlib.path import Path as Outline
from mlflow.tracking import MlflowClient
from PIL import Image
from slide_helpers import corrupt_tiff_tile, write_test_slide
from sklearn.metrics import roc_auc_score

from histo_transfer.tasks.cli import path_overrides
from histo_transfer.tasks.predict_slide import PATH_KEYS

PCAM_MPP = 0.972  # the slides are written at the model's resolution: level 0 is read as it is
WINDOW = 96
SLIDE_SCRIPT = "predict_slide.py"
ARTIFACTS = {"overlay.png", "probability_map.png", "probability_map.npy", "tiles.csv", "tumour_regions.geojson"}
METRICS = {"slide/max_prob", "slide/top_k_mean", "slide/tumour_area_mm2", "slide/tissue_area_mm2",
           "slide/tiles_scored", "slide/regions_unreadable"}


def _inside(x, y, rect) -> np.ndarray:
    left, top, width, height = rect
    return (x >= left) & (x < left + width) & (y >= top) & (y < top + height)


def _training_patches(root, count: int = 100, seed: int = 7) -> None:
    """A Kaggle-layout folder: `count` windows from the tumour of a synthetic slide (label 1) and
    `count` from its tissue outside the tumour (label 0)."""
    (root / "train").mkdir(parents=True)
    written = write_test_slide(root.parent / "training_slide.tif", mpp=PCAM_MPP, tumour=(512, 256, 512, 384), seed=seed)
    image = tifffile.imread(written.path)
    rng = np.random.default_rng(seed)
    rows = []
    for label, rect in ((1, written.tumour), (0, written.tissue)):
        kept = 0
        while kept < count:
            x = rng.integers(rect[0], rect[0] + rect[2] - WINDOW + 1)
            y = rng.integers(rect[1], rect[1] + rect[3] - WINDOW + 1)
            corners = _inside(np.array([x, x + WINDOW - 1]), np.array([y, y + WINDOW - 1]), written.tumour)
            if label == 0 and corners.any():  # normal windows lie wholly outside the tumour
                continue
            patch_id = f"{label}{kept:039x}"
            Image.fromarray(image[y:y + WINDOW, x:x + WINDOW]).save(root / "train" / f"{patch_id}.tif")
            rows.append(f"{patch_id},{label}\n")
            kept += 1
    (root / "train_labels.csv").write_text("id,label\n" + "".join(rows))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model's training run id, and the store's overrides."""
    tmp = tmp_path_factory.mktemp("slide_model")
    _training_patches(tmp / "patches")
    store = [*store_overrides(tmp), "tracking.system_metrics=false"]
    result = run_cli([*TINY_MODEL, "trainer.epochs=3", "data=kaggle", f"data.root={tmp / 'patches'}", *store])
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
    [run] = mlflow.search_runs(experiment_names=["histo-transfer"], output_format="list")
    return {"run_id": run.info.run_id, "store": store, "tmp": tmp}


def _client(trained) -> MlflowClient:
    return MlflowClient(f"sqlite:///{trained['tmp'] / 'mlruns' / 'mlflow.db'}")


def _predict_slide(trained, *args):
    return run_cli([f"model={trained['run_id']}", *trained["store"], *args], script=SLIDE_SCRIPT)


def _runs(trained, kind: str) -> list:
    client = _client(trained)
    [experiment] = [e for e in client.search_experiments() if e.name == "histo-transfer"]
    return client.search_runs([experiment.experiment_id], f"tags.kind = '{kind}'", order_by=["start_time ASC"])


@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory):
    """The default test slide scored by `python predict_slide.py model=<run> slide=PATH output=DIR`."""
    tmp = tmp_path_factory.mktemp("scored")
    written = write_test_slide(tmp / "slide.tif", mpp=PCAM_MPP)
    result = _predict_slide(trained, f"slide={written.path}", f"output={tmp / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = [r for r in _runs(trained, "slide") if r.data.tags["slide_path"] == str(written.path)]
    return {"written": written, "result": result, "run": run, "folder": tmp / "out" / "slide",
            "tiles": pd.read_csv(tmp / "out" / "slide" / "tiles.csv")}


# --- the command line -----------------------------------------------------------------------------


def test_slide_equals_path_names_the_file_and_slide_equals_option_still_picks_the_group(tmp_path):
    slide = tmp_path / "scan.svs"
    assert path_overrides([f"slide={slide}", "tta=flips", "slide.mpp=0.5"], CONF_DIR, PATH_KEYS) == [
        f"slide.path={slide}", "tta=flips", "slide.mpp=0.5"]
    assert path_overrides(["slide=default", "--cfg", "job"], CONF_DIR, PATH_KEYS) == ["slide=default", "--cfg", "job"]
    assert path_overrides([f"slide={slide}"], CONF_DIR, ()) == [f"slide={slide}"]  # only where a task asks


@pytest.mark.parametrize(("args", "message"), [
    ([], "slide.path: give one slide (slide=PATH) or many"),
    (["slide=/no/such/scan.svs"], "slide.path: /no/such/scan.svs: no such slide file"),
    (["slides=/no/such/*.svs"], "slides: /no/such/*.svs: neither a folder nor a glob"),
    (["slide=/no/such/scan.svs", "slide.stride=31"], "slide.stride: 31 must be even"),
])
def test_config_mistakes_fail_in_one_line_before_tensorflow(args, message, tmp_path):
    result = run_cli(["model=abc", *store_overrides(tmp_path), *args], script=SLIDE_SCRIPT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


# --- one slide ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_slide_is_one_finished_run_linked_to_the_model_with_every_output_and_metric(trained, scored):
    run = scored["run"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["source_run_id"] == trained["run_id"] and run.data.tags["tta"] == "none"
    assert METRICS <= set(run.data.metrics)
    artifacts = {a.path for a in _client(trained).list_artifacts(run.info.run_id, "slide")}
    assert artifacts == {f"slide/{name}" for name in ARTIFACTS}
    assert {path.name for path in scored["folder"].iterdir()} == ARTIFACTS
    tiles = scored["tiles"]
    assert list(tiles.columns) == ["x", "y", "row", "col", "probability"]
    assert len(tiles) == run.data.metrics["slide/tiles_scored"] and run.data.metrics["slide/regions_unreadable"] == 0
    assert run.data.metrics["slide/max_prob"] == pytest.approx(tiles["probability"].max(), abs=1e-4)
    grid = np.load(scored["folder"] / "probability_map.npy")
    assert grid.shape == (32, 48)  # 1024 x 1536 px in 32-px cells
    assert np.isfinite(grid).sum() == len(tiles)
    assert np.allclose(grid[tiles["row"], tiles["col"]], tiles["probability"], atol=1e-4)
    image = Image.open(scored["folder"] / "probability_map.png")
    assert image.mode == "L" and image.size == (48, 32)
    # about 1024 x 640 px of tissue at 0.972 um/px: 0.62 mm^2; the scored cells reach a little beyond it
    assert 0.5 < run.data.metrics["slide/tissue_area_mm2"] < 0.9
    assert "tiles/s" in scored["result"].stdout


@pytest.mark.slow
def test_tiles_inside_the_tumour_rank_above_those_outside_and_background_is_never_scored(scored):
    tiles, written = scored["tiles"], scored["written"]
    inside = _inside(tiles["x"], tiles["y"], written.tumour)
    assert inside.sum() >= 30 and (~inside).sum() >= 300
    assert roc_auc_score(inside, tiles["probability"]) > 0.95
    # every scored window holds tissue: its centre lies within half a window of the tissue rectangle
    left, top, width, height = written.tissue
    half = WINDOW / 2
    assert (tiles["x"] > left - half).all() and (tiles["x"] < left + width + half).all()
    assert (tiles["y"] > top - half).all() and (tiles["y"] < top + height + half).all()


@pytest.mark.slow
def test_the_geojson_tumour_polygon_overlaps_the_known_region(scored):
    collection = json.loads((scored["folder"] / "tumour_regions.geojson").read_text())
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and features
    largest = features[0]
    assert largest["properties"]["classification"]["name"] == "Tumor"
    outline = np.array(largest["geometry"]["coordinates"][0])
    left, top, width, height = scored["written"].tumour
    assert Outline(outline).contains_point((left + width / 2, top + height / 2))
    box = (*outline.min(axis=0), *outline.max(axis=0))
    shared = max(0, min(box[2], left + width) - max(box[0], left)) * max(0, min(box[3], top + height) - max(box[1], top))
    union = (box[2] - box[0]) * (box[3] - box[1]) + width * height - shared
    assert shared / union > 0.5
    assert scored["run"].data.metrics["slide/tumour_area_mm2"] > 0


@pytest.mark.slow
def test_the_overlay_paints_tissue_by_probability_and_leaves_glass_white(scored):
    overlay = np.asarray(Image.open(scored["folder"] / "overlay.png").convert("RGB")).astype(int)
    assert overlay.shape == (512, 768, 3)  # a small slide's thumbnail is its level 1, half its size
    assert (overlay[:50, :50] == 255).all()  # glass, not scored
    left, top, width, height = (side // 2 for side in scored["written"].tumour)
    tumour = overlay[top + 10:top + height - 10, left + 10:left + width - 10].reshape(-1, 3).mean(axis=0)
    assert tumour[0] > tumour[2]  # red (high) in turbo's colours, over purple tissue


@pytest.mark.slow
def test_an_unreadable_region_mid_slide_is_logged_with_its_coordinates_and_the_rest_scored(trained, tmp_path):
    written = write_test_slide(tmp_path / "torn.tif", mpp=PCAM_MPP)
    x, y, _, _ = corrupt_tiff_tile(written.path, 300, 300)  # level 0, inside the tissue
    result = _predict_slide(trained, f"slide={written.path}", f"output={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = [r for r in _runs(trained, "slide") if r.data.tags["slide_path"] == str(written.path)]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["slide/regions_unreadable"] > 0 and run.data.metrics["slide/tiles_scored"] > 300
    unreadable = pd.read_csv(tmp_path / "out" / "torn" / "unreadable_regions.csv")
    assert len(unreadable) == run.data.metrics["slide/regions_unreadable"]
    assert (unreadable["x"] < x + 256).all() and (unreadable["x"] + unreadable["width"] > x).all()
    assert "skipped the unreadable region x=" in result.stdout + result.stderr
    assert "slide/unreadable_regions.csv" in {a.path for a in _client(trained).list_artifacts(run.info.run_id, "slide")}


def _bad_slide(kind: str, folder):
    """A slide file that cannot be scored, and what its one-line error says."""
    path = folder / {"random": "random.tif", "truncated": "cut.tif", "format": "notes.svs", "blank": "blank.tif",
                     "tiny": "tiny.tif", "no_mpp": "nompp.tif"}[kind]
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
        return path, "corrupt or truncated|not a whole-slide image"
    if kind == "format":
        path.write_text("not a slide\n" * 100)
        return path, "not a whole-slide image in a format OpenSlide reads"
    if kind == "truncated":
        whole = write_test_slide(folder / "whole.tif", mpp=PCAM_MPP).path.read_bytes()
        path.write_bytes(whole[:len(whole) * 9 // 10])
        return path, "corrupt or truncated|not a whole-slide image"
    if kind == "blank":
        write_test_slide(path, mpp=PCAM_MPP, blank=True)
        return path, "no tissue found"
    if kind == "tiny":
        write_test_slide(path, size=(90, 80), mpp=PCAM_MPP, tissue=(8, 8, 70, 60), tumour=(20, 20, 10, 10), levels=1)
        return path, "smaller than one 96x96 tile"
    write_test_slide(path, mpp=None)
    return path, "slide.mpp_override"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "truncated", "format", "blank", "tiny", "no_mpp"])
def test_each_bad_slide_is_one_line_naming_it_exit_2_and_no_run(trained, tmp_path, kind):
    path, says = _bad_slide(kind, tmp_path)
    before = len(_runs(trained, "slide"))
    result = _predict_slide(trained, f"slide={path}", f"output={tmp_path / 'out'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and str(path) in lines[0]
    assert pd.Series(lines).str.contains(says).all(), lines[0]
    assert len(_runs(trained, "slide")) == before  # it failed before any run started


# --- many slides ----------------------------------------------------------------------------------


@pytest.fixture
def slide_folder(tmp_path):
    """Two small good slides, a broken one, and a file that is not a slide by its name."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name, seed in (("a.tif", 1), ("c.tif", 2)):
        write_test_slide(folder / name, size=(512, 384), mpp=PCAM_MPP, tissue=(64, 64, 384, 256),
                         tumour=(192, 128, 128, 96), seed=seed)
    (folder / "b.tif").write_bytes(b"II*\x00" + bytes(5000))  # a TIFF header, then nothing
    (folder / "README.txt").write_text("not a slide")
    return folder


@pytest.mark.slow
def test_a_folder_with_a_broken_slide_fails_that_slide_alone_and_says_which(trained, slide_folder, tmp_path):
    result = _predict_slide(trained, f"slides={slide_folder}", f"output={tmp_path / 'out'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: 1 of 3 slides failed (b.tif)"), result.stderr[-3000:]
    [parent] = [r for r in _runs(trained, "slide-folder") if r.data.tags["slides"] == str(slide_folder)]
    assert parent.info.status == "FAILED" and parent.data.metrics["slides_failed"] == 1
    children = {run.data.tags["slide_path"]: run for run in _runs(trained, "slide")
                if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {path.split("/")[-1]: run.info.status for path, run in children.items()} == {
        "a.tif": "FINISHED", "b.tif": "FAILED", "c.tif": "FINISHED"}
    assert "b.tif" in children[str(slide_folder / "b.tif")].data.tags["error"]
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="summary/slides.csv",
                                                            dst_path=str(tmp_path / "summary")))
    assert set(table["run_id"]) == {run.info.run_id for run in children.values()}
    assert table["status"].tolist()[-1] == "FAILED"  # most suspicious first, failed last
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"a", "c"}
    assert not [run for run in _runs(trained, "slide") + _runs(trained, "slide-folder") if run.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_glob_of_slides_with_an_ensemble_and_tta_finishes_under_one_parent(trained, slide_folder, tmp_path):
    pattern = slide_folder / "[ac].tif"
    result = run_cli([f"model=[{trained['run_id']},{trained['run_id']}]", "ensemble.method=rank", "tta=flips",
                      f"slides='{pattern}'", f"output={tmp_path / 'out'}", *trained["store"]], script=SLIDE_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    [parent] = [r for r in _runs(trained, "slide-folder") if r.data.tags["slides"] == str(pattern)]
    assert parent.info.status == "FINISHED" and parent.data.tags["n_members"] == "2"
    children = [run for run in _runs(trained, "slide") if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [run.info.status for run in children] == ["FINISHED", "FINISHED"]
    assert all(run.data.tags["tta"] == "flips" and run.data.tags["ensemble_method"] == "rank" for run in children)


@pytest.mark.slow
def test_a_sweep_over_slides_runs_a_job_per_slide_under_one_parent(trained, slide_folder, tmp_path):
    """`-m slide=a,c`: what a launcher (SLURM, Ray, joblib) spreads; here Hydra's basic one, in turn."""
    slides = f"{slide_folder / 'a.tif'},{slide_folder / 'c.tif'}"
    result = run_cli(["-m", f"model={trained['run_id']}", f"slide={slides}", f"output={tmp_path / 'out'}",
                      *trained["store"]], script=SLIDE_SCRIPT)  # -m first: Hydra reads no override before it
    assert result.returncode == 0, result.stderr[-3000:]
    [parent] = [r for r in _runs(trained, "slide-folder") if slides in r.data.tags["slides"]]
    assert parent.info.status == "FINISHED" and parent.data.metrics["slides_scored"] == 2
    children = [run for run in _runs(trained, "slide") if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["slide_path"].split("/")[-1] for run in children) == ["a.tif", "c.tif"]
    assert all(run.info.status == "FINISHED" for run in children)


def test_bench_slide_times_tissue_reading_model_and_end_to_end_on_a_synthetic_slide():
    result = run_cli(["--size", "1024x768", "--backbone", "tiny_cnn", "--batch-size", "64"], script="scripts/bench_slide.py")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert list(rows) == ["tissue detection (thumbnail, mask, tile choice)", "reading alone",
                          "model alone (tiles in memory)", "end to end (tissue detection + reading overlapped with scoring)"]
    tiles = int(result.stdout.split(" tissue tiles")[0].rsplit(", ", 1)[1].replace(",", ""))
    assert 0 < tiles < (1024 // 32) * (768 // 32)  # glass around the tissue is never read
    seconds = {name: float(values[0]) for name, values in rows.items()}
    assert seconds["end to end (tissue detection + reading overlapped with scoring)"] > seconds[
        "tissue detection (thumbnail, mask, tile choice)"] > 0
    busy = result.stdout.split("model busy: ")[1]
    shares = [int(part.split("%")[0]) for part in busy.split(", ")]
    assert len(shares) == 2 and 0 < shares[0] <= shares[1]
