"""Packed cache: every patch decoded once, in parallel worker processes, into one memory-mapped
uint8 array with an index of ids and labels. Keyed by a fingerprint of the source, so unchanged
data is reused and changed data rebuilds. Written under a temporary name and renamed when
complete: an interrupted build is never read, and the next run redoes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_transfer import IMAGE_SHAPE
from histo_transfer.config.errors import DataError, DiskFull
from histo_transfer.data.images import read_patch

log = logging.getLogger(__name__)

CACHE_VERSION = 1
IMAGES_FILE, INDEX_FILE, META_FILE = "images.npy", "index.npz", "meta.json"
CHUNK = 256  # images per worker task


@dataclass
class PackedPatches:
    folder: Path
    images: np.ndarray  # (N, 96, 96, 3) uint8, memory-mapped read-only
    ids: np.ndarray  # str
    labels: np.ndarray  # int8; -1 where unlabelled
    groups: np.ndarray  # str, e.g. the official split each patch comes from
    bad: dict[int, str]  # index -> why it could not be decoded (its row in images is zeros)

    def usable(self, policy: str) -> np.ndarray:
        """Indices to train on under `data.on_bad_image`: `error` refuses any bad image, `skip` leaves them out."""
        if self.bad and policy == "error":
            first = next(iter(self.bad.values()))
            more = f" (and {len(self.bad) - 1} more bad images)" if len(self.bad) > 1 else ""
            raise DataError(f"{first}{more}; fix or remove it, or set data.on_bad_image=skip to train without them")
        keep = np.ones(len(self.ids), dtype=bool)
        keep[list(self.bad)] = False
        return np.flatnonzero(keep)

    def bad_report(self) -> str:
        return "".join(f"{self.ids[index]}\t{why}\n" for index, why in sorted(self.bad.items()))


class Rows:
    """Rows `indices` of an image array, read only when indexed (a memory map stays on disk):
    reports index a few patches of a split that may not fit in memory."""

    def __init__(self, images, indices: np.ndarray):
        self.images, self.indices = images, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        return self.images[self.indices[item]]


def cache_folder(cache_dir: Path, name: str, key: str) -> Path:
    return Path(cache_dir).expanduser().resolve() / f"{name}-v{CACHE_VERSION}-{key}"


def open_packed(folder: Path) -> PackedPatches:
    meta = json.loads((folder / META_FILE).read_text())
    index = np.load(folder / INDEX_FILE)
    return PackedPatches(
        folder=folder,
        images=np.load(folder / IMAGES_FILE, mmap_mode="r"),
        ids=index["ids"], labels=index["labels"], groups=index["groups"],
        bad={int(k): v for k, v in meta["bad"].items()},
    )


def packed(folder: Path, source: "PatchSource", workers: int | None = None) -> PackedPatches:
    """The cache at `folder`, built from `source` first if it is not there yet. Processes that need the
    same cache at once (jobs starting together on a shared file system) build it once: the others
    wait for the first and reuse what it wrote."""
    if (folder / META_FILE).exists():
        return open_packed(folder)
    with build_lock(folder):
        if (folder / META_FILE).exists():
            log.info("%s was built by another process meanwhile: reused", folder)
            return open_packed(folder)
        return _build(folder, source, workers)


@contextlib.contextmanager
def build_lock(folder: Path):
    """An exclusive lock on building `folder` (fcntl: released by the system if its holder dies)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building %s", folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def allocated_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 .npy array mapped into memory, its disk blocks reserved first. Without the
    reservation the file is sparse, and a disk that fills while it is written kills the process
    (SIGBUS on the mapped page) instead of raising "no space left"."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "r+b") as stream:
        try:
            os.posix_fallocate(stream.fileno(), 0, images.offset + images.nbytes)
        except AttributeError:
            pass  # not on this system (macOS): a sparse file, as before
        except OSError as exc:
            if DiskFull.caused(exc):
                raise
            log.debug("%s: blocks not reserved (%s); the file stays sparse", path, exc)  # a file system without it
    return images


def _build(folder: Path, source: "PatchSource", workers: int | None) -> PackedPatches:
    _remove_abandoned_builds(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    started = time.perf_counter()
    try:
        bad = source.write(staging, workers)
        meta = {"version": CACHE_VERSION, "count": len(source), "bad": {str(k): v for k, v in bad.items()},
                "seconds": round(time.perf_counter() - started, 2)}
        np.savez(staging / INDEX_FILE, ids=source.ids, labels=source.labels, groups=source.groups)
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))  # written last: marks completion
        if folder.exists() and not (folder / META_FILE).exists():
            shutil.rmtree(folder)  # not ours to trust: a cache is complete only with its meta file
        staging.rename(folder)
    except OSError as exc:
        if DiskFull.caused(exc):
            raise DiskFull(f"{folder.parent}: no space left on the device for the packed cache of {len(source):,} "
                           f"patches ({len(source) * int(np.prod(IMAGE_SHAPE)) / 1e9:.2f} GB); nothing was kept. Free space "
                           "or point paths.cache_dir elsewhere, and run again") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("packed %d patches into %s in %.1f s (%.0f images/s)", len(source), folder, seconds,
             len(source) / max(seconds, 1e-9))
    return open_packed(folder)


def _remove_abandoned_builds(folder: Path) -> None:
    """Staging folders of builds whose process died (killed, machine lost)."""
    for staging in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = int(staging.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


class PatchSource:
    """What goes into a cache: ids, labels, groups, and how to write the images array."""

    ids: np.ndarray
    labels: np.ndarray
    groups: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def write(self, folder: Path, workers: int | None) -> dict[int, str]:
        raise NotImplementedError


class ImageFiles(PatchSource):
    """Image files (TIFF, JPEG, PNG) decoded by a pool of worker processes straight into the memory map."""

    def __init__(self, paths: list[Path], ids, labels=None, group=""):
        """`group`: one name for all (e.g. "train"), or one per image."""
        self.paths = [str(p) for p in paths]
        self.ids = np.asarray(ids, dtype=str)
        self.labels = np.full(len(ids), -1, np.int8) if labels is None else np.asarray(labels, np.int8)
        self.groups = np.full(len(ids), group) if isinstance(group, str) else np.asarray(group, dtype=str)

    def write(self, folder: Path, workers: int | None) -> dict[int, str]:
        target = folder / IMAGES_FILE
        allocated_memmap(target, (len(self), *IMAGE_SHAPE)).flush()
        chunks = [(target, start, self.paths[start:start + CHUNK]) for start in range(0, len(self), CHUNK)]
        # a pool's processes each import numpy and the readers (~1.5 s): worth it from two chunks on
        workers = min(workers or os.cpu_count() or 1, len(chunks))
        bad: dict[int, str] = {}
        with contextlib.ExitStack() as stack:
            if workers <= 1 or not _may_start_processes():
                results = map(_decode_chunk, chunks)
            else:  # spawn, not fork: the parent may run TensorFlow threads, which fork copies mid-flight
                pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
                results = pool.imap_unordered(_decode_chunk, chunks)
            bar = stack.enter_context(progress(len(self), "decoding patches"))
            for done, chunk_bad in results:
                bad.update(chunk_bad)
                bar.update(done)
        return bad


def _may_start_processes() -> bool:
    """False inside a job of a parallel sweep: a daemonic process may not have children, and a
    joblib (loky) worker passes its own start method on to them, which plain multiprocessing lacks."""
    method = multiprocessing.get_start_method(allow_none=True)
    return not multiprocessing.current_process().daemon and method in (None, "fork", "spawn", "forkserver")


def _decode_chunk(task) -> tuple[int, dict[int, str]]:
    target, start, paths = task
    images = np.load(target, mmap_mode="r+")
    bad = {}
    for offset, path in enumerate(paths):
        try:
            images[start + offset] = read_patch(Path(path))
        except DataError as exc:
            bad[start + offset] = str(exc)
    images.flush()
    return len(paths), bad


def progress(total: int, description: str):
    from tqdm import tqdm

    # disable=None: a bar in a terminal, nothing in logs and CI
    return tqdm(total=total, desc=description, unit="img", unit_scale=True, mininterval=1.0, disable=None)
