"""The packed cache: built once in parallel, reused while the data is unchanged, never read half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose_config, store_overrides, write_kaggle_layout

from histo_transfer.config.errors import DataError
from histo_transfer.data.cache import ImageFiles, cache_folder, packed
from histo_transfer.data.images import read_patch
from histo_transfer.data.loading import load_training_data


@pytest.fixture
def kaggle(tmp_path):
    root = tmp_path / "kaggle"
    ids = write_kaggle_layout(root, [0, 1] * 150)
    cfg = compose_config(["data=kaggle", f"data.root={root}", *store_overrides(tmp_path), "data.workers=2"])
    return root, ids, cfg


def test_cache_holds_every_patch_decoded_in_parallel(kaggle):
    root, ids, cfg = kaggle
    data = load_training_data(cfg.data)
    patches = data.patches
    assert isinstance(patches.images, np.memmap) and not patches.images.flags.writeable
    assert patches.ids.tolist() == ids and patches.labels.tolist() == [0, 1] * 150
    for index in (0, 137, 299):  # across worker chunks
        assert np.array_equal(patches.images[index], read_patch(root / "train" / f"{ids[index]}.tif"))
    assert len(data.train_indices) == 240 and len(data.val_indices) == 60


def test_unchanged_data_reuses_the_cache_and_changed_data_rebuilds(kaggle):
    root, ids, cfg = kaggle
    first = load_training_data(cfg.data).patches.folder
    meta_time = (first / "meta.json").stat().st_mtime_ns
    assert load_training_data(cfg.data).patches.folder == first
    assert (first / "meta.json").stat().st_mtime_ns == meta_time
    labels = (root / "train_labels.csv").read_text().replace(f"{ids[0]},0", f"{ids[0]},1")
    (root / "train_labels.csv").write_text(labels)
    rebuilt = load_training_data(cfg.data)
    assert rebuilt.patches.folder != first and rebuilt.patches.labels[0] == 1


def test_an_interrupted_build_is_never_read_and_is_redone(kaggle, tmp_path):
    root, ids, cfg = kaggle
    source = ImageFiles([root / "train" / f"{i}.tif" for i in ids], ids, [0, 1] * 150)
    folder = cache_folder(tmp_path / "c", "train", "abc")
    folder.parent.mkdir(parents=True)
    abandoned = folder.with_name(f".{folder.name}.tmp-999999999")  # a build whose process died
    abandoned.mkdir()
    (abandoned / "images.npy").write_bytes(b"half")
    folder.mkdir()  # a folder without its meta file is incomplete
    (folder / "images.npy").write_bytes(b"half")
    patches = packed(folder, source, workers=1)
    assert not abandoned.exists()
    assert json.loads((folder / "meta.json").read_text())["count"] == 300
    assert np.array_equal(patches.images[5], read_patch(root / "train" / f"{ids[5]}.tif"))


def test_bad_images_are_recorded_once_and_refused_or_skipped(kaggle):
    root, ids, cfg = kaggle
    (root / "train" / f"{ids[7]}.tif").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match=f"{ids[7]}.tif: corrupt .*data.on_bad_image=skip"):
        load_training_data(cfg.data)
    cfg.data.on_bad_image = "skip"
    data = load_training_data(cfg.data)  # same cache: bad images are part of what it records
    assert list(data.patches.bad) == [7]
    assert 7 not in set(data.train_indices) | set(data.val_indices)
    assert len(data.train_indices) + len(data.val_indices) == 299


def _prepare(root, tmp_path, log):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "data=kaggle",
                             f"data.root={root}", *store_overrides(tmp_path), "data.workers=1"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.scaleout  # two jobs starting together on a shared filesystem
def test_a_second_process_waits_for_the_build_and_reuses_it(kaggle, tmp_path):
    """Deterministic: this test holds the build lock, so the script must wait, then reuse."""
    import time

    from histo_transfer.data.cache import _build, build_lock
    from histo_transfer.data.kaggle import fingerprint, read_labelled
    from histo_transfer.data.sources import data_source

    root, ids, cfg = kaggle
    source = data_source(cfg.data)
    folder = cache_folder(cfg.data.cache_dir, "train", fingerprint(root))
    log = tmp_path / "second.log"
    with build_lock(folder), open(log, "w") as out:
        process = _prepare(root, tmp_path, out)
        deadline = time.time() + 120
        while "waiting for another process building" not in log.read_text():
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.1)
        listing = read_labelled(root)
        _build(folder, ImageFiles(listing.paths(), listing.ids, listing.labels, group="train"), 1)
    assert process.wait(timeout=120) == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "built by another process meanwhile: reused" in text and "packed 300 patches" not in text
    assert len([p for p in folder.parent.iterdir() if not p.name.startswith(".")]) == 1
    assert source.labelled().patches.ids.tolist() == ids


@pytest.mark.scaleout
def test_two_processes_building_the_same_cache_build_it_once(kaggle, tmp_path):
    root, ids, cfg = kaggle
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with open(logs[0], "w") as first, open(logs[1], "w") as second:
        processes = [_prepare(root, tmp_path, first), _prepare(root, tmp_path, second)]
        assert [p.wait(timeout=300) for p in processes] == [0, 0]
    texts = [log.read_text() for log in logs]
    assert sum(text.count("packed 300 patches") for text in texts) == 1  # built once, never doubled
    caches = [p for p in (tmp_path / "cache" / "packed").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1 and not list((tmp_path / "cache" / "packed").glob(".*.tmp-*"))
    data = load_training_data(cfg.data)
    assert data.patches.ids.tolist() == ids
    assert np.array_equal(data.images[7], read_patch(root / "train" / f"{ids[7]}.tif"))
