"""Every bad-data case, through `scripts/prepare_data.py` as a user meets it: one line naming the
file or CSV row, exit status 2, no traceback, no cache left behind for bad labels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli, write_kaggle_layout
from PIL import Image


def prepare(root, tmp_path, *extra):
    return run_cli(["data=kaggle", f"data.root={root}", f"paths.cache_dir={tmp_path / 'cache'}", *extra],
                   script="scripts/prepare_data.py", timeout=120)


def assert_refused(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "data"
    return root, write_kaggle_layout(root, [0, 1, 0, 1])


def _image(root, image_id):
    return root / "train" / f"{image_id}.tif"


def test_corrupt_tiff(layout, tmp_path):
    root, ids = layout
    _image(root, ids[1]).write_bytes(b"II*\x00garbage")
    assert_refused(prepare(root, tmp_path), f"{ids[1]}.tif: corrupt or unreadable image", "data.on_bad_image=skip")


def test_truncated_tiff(layout, tmp_path):
    root, ids = layout
    _image(root, ids[2]).write_bytes(_image(root, ids[2]).read_bytes()[:9000])
    assert_refused(prepare(root, tmp_path), f"{ids[2]}.tif: corrupt or unreadable image")


@pytest.mark.parametrize(("mode", "size", "described"), [
    ("L", (96, 96), "96x96 L"), ("RGBA", (96, 96), "96x96 RGBA"), ("RGB", (50, 96), "50x96 RGB")])
def test_image_that_is_not_96x96_rgb(layout, tmp_path, mode, size, described):
    root, ids = layout
    channels = {"L": (), "RGBA": (4,), "RGB": (3,)}[mode]
    Image.fromarray(np.zeros((size[1], size[0], *channels), np.uint8), mode).save(_image(root, ids[0]))
    assert_refused(prepare(root, tmp_path), f"{ids[0]}.tif: image is {described}; expected 96x96 RGB")


def test_skip_policy_reports_and_leaves_bad_images_out(layout, tmp_path):
    root, ids = layout
    _image(root, ids[1]).write_bytes(b"broken")
    result = prepare(root, tmp_path, "data.on_bad_image=skip")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 bad images left out" in result.stdout and f"{ids[1]}\t" in result.stdout


def test_csv_id_without_file(layout, tmp_path):
    root, ids = layout
    _image(root, ids[3]).unlink()
    assert_refused(prepare(root, tmp_path), f"{ids[3]}.tif: listed in", "train_labels.csv but not found")


def test_file_without_csv_row_is_ignored_counted_and_reported(layout, tmp_path):
    root, ids = layout
    extra = root / "train" / "stray.tif"
    extra.write_bytes(_image(root, ids[0]).read_bytes())
    result = prepare(root, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 files without a row in train_labels.csv (ignored), e.g. stray.tif" in result.stdout
    assert "4 labelled patches" in result.stdout


@pytest.mark.parametrize(("rows", "fragment"), [
    ("{0},0\n{1},1\n{0},1\n", "row 4: id {0} appears more than once"),
    ("{0},0\n{1},3\n", "row 3: label '3' is not 0 or 1"),
    ("{0},0\n{1},\n", "row 3: label '' is not 0 or 1"),
    ("{0},0\n../{1},1\n", "row 3: id '../{1}' is not a plain file name"),
    ("{0},0\n/abs/{1},1\n", "row 3: id '/abs/{1}' is not a plain file name"),
    ("{0},0\nsub\\\\{1},1\n", "is not a plain file name"),
])
def test_bad_csv_rows(layout, tmp_path, rows, fragment):
    root, ids = layout
    (root / "train_labels.csv").write_text("id,label\n" + rows.format(*ids))
    assert_refused(prepare(root, tmp_path), fragment.format(*ids))
    assert not (tmp_path / "cache").exists()  # nothing written for refused labels


@pytest.mark.parametrize(("content", "fragment"), [
    (b"image,label\nx,1\n", "columns are image,label; expected exactly id,label"),
    (b"id\nx\n", "columns are id; expected exactly id,label"),
    (b"", "file is empty"),
    (b"id,label\n", "has a header but no rows"),
    ("id,label\nd\xe9j\xe0,1\n".encode("latin-1"), "not UTF-8"),
])
def test_bad_labels_file(layout, tmp_path, content, fragment):
    root, _ = layout
    (root / "train_labels.csv").write_bytes(content)
    assert_refused(prepare(root, tmp_path), "train_labels.csv", fragment)


def test_crlf_line_endings_are_accepted(layout, tmp_path):
    root, _ = layout
    assert b"\r\n" in (root / "train_labels.csv").read_bytes()
    result = prepare(root, tmp_path)
    assert result.returncode == 0 and "4 labelled patches (2 with label 1)" in result.stdout


def test_empty_train_folder(layout, tmp_path):
    root, ids = layout
    for image_id in ids:
        _image(root, image_id).unlink()
    assert_refused(prepare(root, tmp_path), "train: folder is empty")


def test_test_folder_with_non_image_files(layout, tmp_path):
    root, ids = layout
    (root / "test").mkdir()
    (root / "test" / "a.tif").write_bytes(_image(root, ids[0]).read_bytes())
    (root / "test" / "notes.txt").write_text("hello")
    assert_refused(prepare(root, tmp_path), "test/notes.txt: not a .tif patch")
