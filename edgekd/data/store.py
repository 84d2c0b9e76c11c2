"""Images decoded once: an image folder decoded in parallel into one uint8 array on disk, then
read by every later run (and every rank) instead of decoded again; Fashion-MNIST's
gzipped IDX files are decompressed into the same cache once (:func:`stored_array`).

The array (N, C, S, S) lives in ``data.cache_dir`` (default ``$EDGEKD_DATA_CACHE`` or
``~/.cache/edgekd/images``), named by a key over what decides its bytes: every file's path, size
and mtime, its class, the storage size S, the resize mode and the channels. A changed, added or
removed file gives a new key, so a stale array is never read. Decoding runs in a process pool
(one per core by default: PIL holds the GIL); the workers write their rows straight into the
file, which is renamed into place only when complete; a file lock lets one process decode while
the others (other ranks, a second build) wait for it and then read.

Memory: :class:`ImageStore` reads the rows a batch asks for straight into that batch's buffer
(no memory map), so a run's resident memory is bounded by what a batch needs, not by the data
set; the kernel's page cache holds what it can and reclaims the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgekd import ui
from edgekd.errors import EdgekdError
from edgekd.runtime.preprocessing import fit_to_square  # one resize for the build and the device (the bundle's torch-free copy)

STORE_VERSION = 1
CACHE_ENV = "EDGEKD_DATA_CACHE"
CHUNK = 256  # images per task in the decode pool


@dataclass(frozen=True)
class Storage:
    """How an image folder is stored once decoded: side S, resize mode, where, with how many processes."""

    size: int = 64
    resize: str = "crop"
    cache_dir: str | None = None
    workers: int | None = None


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgekd" / "images")


class ImageStore:
    """A read-only (N, C, S, S) uint8 array in a file; ``take(rows)`` reads only those rows.

    Rows are read with ``os.preadv`` into the batch's own buffer, one call per run of adjacent
    rows, instead of through a memory map: a map's pages count in the process's resident set
    once touched (and the kernel maps up to 16 neighbouring pages per fault), so an epoch over a
    map grows the RSS towards the array's size; a read leaves them in the page cache only, which
    the kernel can reclaim. One epoch of 50,000 images at 128 px: ``benchmarks/data_scale.py``."""

    def __init__(self, path: Path, shape: tuple[int, int, int, int]):
        self.path, self.shape = path, tuple(shape)
        self._fd = os.open(path, os.O_RDONLY)
        self._row_bytes = int(np.prod(self.shape[1:]))
        expected = self.shape[0] * self._row_bytes
        if os.fstat(self._fd).st_size != expected:
            os.close(self._fd)
            self._fd = None  # closed here: __del__ must not close the number again (another file may hold it by then)
            raise EdgekdError(f"the image cache file {path} has {os.path.getsize(path):,} bytes, not {expected:,}", "delete it; the next run decodes the images again")

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        flat = out.reshape(len(rows), self._row_bytes)
        sorted_rows = rows[order]
        if len(rows) and (sorted_rows[0] < 0 or sorted_rows[-1] >= self.shape[0]):
            raise IndexError(f"row out of range 0..{self.shape[0] - 1}")
        start = 0
        for end in range(1, len(rows) + 1):  # one read per run of adjacent rows (a slice is one run)
            if end < len(rows) and sorted_rows[end] == sorted_rows[end - 1] + 1 and order[end] == order[end - 1] + 1:
                continue
            first = order[start]
            view = flat[first : first + (end - start)]
            got = os.preadv(self._fd, [memoryview(view).cast("B")], int(sorted_rows[start]) * self._row_bytes)
            if got != view.nbytes:
                raise EdgekdError(f"short read from the image cache {self.path}", "delete it; the next run decodes the images again")
            start = end
        return out

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def __getstate__(self):  # a process pool or a copy reopens the file instead of sharing the descriptor
        return {"path": self.path, "shape": self.shape}

    def __setstate__(self, state):
        self.__init__(state["path"], state["shape"])


def folder_key(files: Sequence[tuple[Path, int]], base: Path, store_size: int, resize: str, channels: int) -> str:
    """What the decoded bytes depend on: each file (path under ``base``, size, mtime, class), S, resize, channels."""
    h = hashlib.sha256(json.dumps({"v": STORE_VERSION, "s": store_size, "resize": resize, "c": channels}).encode())
    prefix = len(str(base).rstrip("/")) + 1  # paths under base, as text (pathlib's relative_to took half the time of a cache hit)
    for p, label in files:
        st = os.stat(p)
        h.update(f"{str(p)[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()[:24]


def _decode_chunk(job: tuple[str, int, list[str], int, str, int]) -> list[int]:
    """Worker: decode files ``paths`` into rows ``first...`` of the array at ``out``; returns the rows that failed."""
    from PIL import Image, UnidentifiedImageError

    out, first, paths, store_size, resize, channels = job
    row_bytes = channels * store_size * store_size
    failed = []
    with open(out, "r+b") as fh:
        for i, p in enumerate(paths):
            try:
                with Image.open(p) as im:
                    arr = np.asarray(fit_to_square(im.convert("L" if channels == 1 else "RGB"), store_size, resize), dtype=np.uint8)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
                failed.append(first + i)
                continue
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            os.pwrite(fh.fileno(), np.ascontiguousarray(arr).tobytes(), (first + i) * row_bytes)
    return failed


def _decode_all(files: Sequence[tuple[Path, int]], tmp: Path, store_size: int, resize: str, channels: int, workers: int) -> list[int]:
    n = len(files)
    with open(tmp, "wb") as fh:
        fh.truncate(n * channels * store_size * store_size)
    jobs = [(str(tmp), s, [str(p) for p, _ in files[s : s + CHUNK]], store_size, resize, channels) for s in range(0, n, CHUNK)]
    failed: list[int] = []
    with ui.progress() as prog:
        task = prog.add_task(f"decode {n:,} images", total=n, rate="", info=f"{workers} process(es)")
        if workers <= 1:
            results = map(_decode_chunk, jobs)
            for job, bad in zip(jobs, results):
                failed += bad
                prog.update(task, advance=len(job[2]))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for job, bad in zip(jobs, pool.map(_decode_chunk, jobs)):
                    failed += bad
                    prog.update(task, advance=len(job[2]))
    return failed


def _cache_folder(storage: Storage) -> Path:
    return Path(storage.cache_dir).expanduser() if storage.cache_dir else default_cache_dir()


def _cached(cache: Path, key: str, build: Callable[[Path], dict]) -> tuple[dict, bool, Path]:
    """(meta, hit, array file) of the cache entry ``key``. ``build(tmp)`` writes the array into ``tmp``
    and returns its meta, once: the array is renamed into place complete, then its meta; a file
    lock makes the other processes (ranks, a second build) wait for it and then read it."""
    data, meta_path = cache / f"{key}.u8", cache / f"{key}.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f"{key}.lock", "a+")
    except OSError as exc:
        raise EdgekdError(f"cannot write the image cache {cache}: {exc.strerror}", "set data.cache_dir (or $EDGEKD_DATA_CACHE) to a writable folder") from exc
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        hit = meta_path.is_file() and data.is_file()
        if not hit:
            tmp, meta_tmp = cache / f".{key}.u8.tmp", cache / f".{key}.json.tmp"
            try:
                meta = build(tmp)
                os.replace(tmp, data)
            finally:
                tmp.unlink(missing_ok=True)
            meta_tmp.write_text(json.dumps(meta))
            os.replace(meta_tmp, meta_path)
        meta = json.loads(meta_path.read_text())
    return meta, hit, data


def decoded_folder(files: Sequence[tuple[Path, int]], base: Path, storage: Storage, channels: int) -> tuple[ImageStore, np.ndarray, np.ndarray, list[str], dict]:
    """(store, rows that decoded, their labels, skipped files, info) for ``files`` (path, class) at S x S.

    Decodes at most once per content: a later call with the same files and settings only maps the
    array (``info['cache'] == 'hit'``)."""
    t0 = time.time()
    workers = storage.workers or len(os.sched_getaffinity(0))

    def build(tmp: Path) -> dict:
        failed = _decode_all(files, tmp, storage.size, storage.resize, channels, workers)
        ui.log(f"decoded {len(files):,} images from {base} in {time.time() - t0:.1f} s ({workers} process(es))")
        return {"version": STORE_VERSION, "shape": [len(files), channels, storage.size, storage.size], "failed": failed, "resize": storage.resize,
                "source": str(base), "decode_seconds": round(time.time() - t0, 2), "workers": workers}

    meta, hit, data = _cached(_cache_folder(storage), folder_key(files, base, storage.size, storage.resize, channels), build)
    store = ImageStore(data, tuple(meta["shape"]))
    failed = set(meta["failed"])
    keep = np.array([i for i in range(len(files)) if i not in failed], dtype=np.int64)
    labels = np.array([files[i][1] for i in keep], dtype=np.int64)
    info = {"cache": "hit" if hit else "decoded", "cache_file": str(data), "decode_seconds": meta["decode_seconds"], "ready_seconds": round(time.time() - t0, 3)}
    return store, keep, labels, [str(files[i][0]) for i in sorted(failed)], info


def stored_array(name: str, sources: Sequence[Path], make: Callable[[], np.ndarray], storage: Storage) -> tuple[ImageStore, bool]:
    """(store, hit) for a data set that arrives as one uint8 array (Fashion-MNIST's gzipped IDX
    files): decompressed once into the cache, keyed by its files' paths, sizes and mtimes."""
    store, _, hit = stored_with_meta(name, sources, lambda: (make(), {}), storage)
    return store, hit


def stored_with_meta(name: str, sources: Sequence[Path], make: Callable[[], tuple[np.ndarray, dict]], storage: Storage) -> tuple[ImageStore, dict, bool]:
    """(store, extra, hit): as :func:`stored_array`, with a small JSON-able ``extra`` (labels, class
    names) kept beside the array, so a cache hit needs nothing else from the source files."""
    h = hashlib.sha256(json.dumps({"v": STORE_VERSION, "name": name}).encode())
    for p in sources:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())

    def build(tmp: Path) -> dict:
        t0 = time.time()
        arr, extra = make()
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        arr.tofile(tmp)
        return {"version": STORE_VERSION, "shape": list(arr.shape), "failed": [], "source": name, "decode_seconds": round(time.time() - t0, 2), "extra": extra}

    meta, hit, data = _cached(_cache_folder(storage), h.hexdigest()[:24], build)
    return ImageStore(data, tuple(meta["shape"])), meta.get("extra", {}), hit
