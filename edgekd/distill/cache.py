"""The teacher-output cache. When augmentation is deterministic ('none': one view per image,
'flip': two views) the teacher's logits (and features) are computed once and kept on disk,
keyed by teacher checksum + data fingerprint + teacher preprocessing + augmentation, so later
epochs and later students cost only the student. 'crop-flip' runs the teacher online.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from edgekd import ui
from edgekd.data import Batch, DataSet, Split, eval_batch_size
from edgekd.data.unlabeled import split_fingerprint
from edgekd.errors import EdgekdError
from edgekd.atomic import atomic_path, sha256_json
from edgekd.models import safe_torch_load
from edgekd.distill.teachers import Teacher, teacher_forward
from edgekd.train.env import current as current_ranks, on_main, share

CACHE_ENV = "EDGEKD_CACHE_DIR"
CACHE_FORMAT = "edgekd-teacher-cache"
CACHE_VERSION = 1
FEATURE_CACHE_LIMIT_BYTES = 2 << 30  # above this a teacher's feature maps are not cached (memory)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgekd" / "teacher-logits")


def views_for(augment: str) -> int | None:
    """Distinct views of one image under an augmentation: 1 ('none'), 2 ('flip'), None = random (not cacheable)."""
    return {"none": 1, "flip": 2}.get(augment)


def cache_key(teacher: Teacher, data: DataSet, augment: str, feature_layer: str | None, split: Split | None = None) -> str:
    """What the cached outputs depend on: teacher weights, data, teacher preprocessing, augmentation, hooked layer
    (for another split than the training set, e.g. the unlabeled images, that split's own identity instead of the data set's)."""
    source = {"data": data.fingerprint(), "train_size": len(data.train)} if split is None else {"split": split_fingerprint(split), "split_size": len(split)}
    return sha256_json({
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher_sha256": teacher.sha256, **source,
        "preprocess": teacher.preprocess.to_dict(), "augment": augment, "feature_layer": feature_layer,
    })[:32]


class TeacherCache:
    """Teacher outputs for every training image and view, (N, V, ...), in memory and on disk.

    View 0 is the image as stored, view 1 its horizontal mirror (what ``data.augment_batch`` does
    for 'flip'), so ``lookup`` indexes with ``batch.indices`` and ``batch.flipped``. Each table
    ('logits', and 'feature' for feature losses) is its own file keyed by :func:`cache_key`, so a
    logits-only run reuses the logits a feature run computed. ``key``/``path`` are the logits'.
    """

    def __init__(self, paths: dict[str, Path], tables: dict[str, torch.Tensor], hit: bool, seconds: float = 0.0):
        self.paths, self.tables, self.hit, self.seconds = paths, tables, hit, seconds
        self.path = paths["logits"]
        self.key = self.path.stem

    def lookup(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        view = batch.flipped.long() if self.tables["logits"].shape[1] > 1 else torch.zeros_like(batch.flipped, dtype=torch.long)
        return {k: v[batch.indices, view].to(device).float() for k, v in self.tables.items()}


def _read_table(path: Path, n: int, views: int) -> torch.Tensor | None:
    """One cached table, or None (missing, unreadable or not matching its key/shape: then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        payload = safe_torch_load(path, "teacher cache")
    except EdgekdError as exc:
        ui.warn(f"ignoring unreadable teacher cache {path} ({exc.message}); recomputing")
        return None
    table = payload.get("table") if isinstance(payload, dict) else None
    if payload.get("key") != path.stem or not isinstance(table, torch.Tensor) or tuple(table.shape[:2]) != (n, views):
        ui.warn(f"teacher cache {path} does not match its key or shape; recomputing")
        return None
    return table


def compute_teacher_tables(teacher: Teacher, split: Split, views: int, device: torch.device, batch_size: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Run the teacher once over every image (and its mirror when views=2): logits float32, features float16."""
    n = len(split)
    batch_size = batch_size or eval_batch_size(teacher.preprocess.input_size)
    tables: dict[str, torch.Tensor] = {}
    t0, done = time.time(), 0
    with ui.progress() as prog:
        task = prog.add_task(f"teacher {teacher.name} -> cache", total=n * views, rate="", info="")
        for start in range(0, n, batch_size):
            images = split.take(slice(start, start + batch_size))
            for v in range(views):
                out = teacher_forward(teacher, images.flip(-1) if v == 1 else images, device)
                for k, val in out.items():
                    if k not in tables:
                        tables[k] = torch.empty((n, views, *val.shape[1:]), dtype=torch.float32 if k == "logits" else torch.float16)
                    tables[k][start : start + len(images), v] = val.cpu().to(tables[k].dtype)
                done += len(images)
                prog.update(task, advance=len(images), rate=f"{done / max(1e-9, time.time() - t0):.0f} img/s")
    return tables, time.time() - t0


def feature_cache_bytes(teacher: Teacher, split: Split, views: int, device: torch.device) -> int:
    """Bytes the hooked feature maps of every image/view would take in float16 (one probe batch)."""
    if teacher.hook is None or len(split) == 0:
        return 0
    out = teacher_forward(teacher, split.take(slice(0, 1)), device)
    return int(out["feature"].numel()) * 2 * len(split) * views


def teacher_cache(teacher: Teacher, data: DataSet, augment: str, cache_dir: Path, device: torch.device, split: Split | None = None) -> TeacherCache | None:
    """The teacher's cached outputs on the training set (or on ``split``: logits only, e.g. the
    unlabeled images, which are always flip-augmented), loaded or built; None when they cannot be
    cached (random crops, too big)."""
    if split is not None:
        return _split_cache(teacher, data, split, cache_dir, device)
    views = views_for(augment)
    if views is None:
        ui.log(f"teacher {teacher.name} runs online every step: data.augment={augment} has random crops, so its outputs are not cacheable "
               "(use --augment flip to cache them and train several times faster)")
        return None
    if feature_cache_bytes(teacher, data.train, views, device) > FEATURE_CACHE_LIMIT_BYTES:
        ui.log(f"teacher {teacher.name} runs online: its '{teacher.hook.path}' feature maps would take over {FEATURE_CACHE_LIMIT_BYTES >> 30} GiB to cache "
               "(pick a smaller --teacher-layer to cache them)")
        return None
    layers = {"logits": None, **({"feature": teacher.hook.path} if teacher.hook is not None else {})}
    paths = {name: Path(cache_dir) / f"{cache_key(teacher, data, augment, layer)}.pt" for name, layer in layers.items()}
    t0 = time.time()
    tables = {name: _read_table(p, len(data.train), views) for name, p in paths.items()}
    if share(all(t is not None for t in tables.values())):  # rank 0's view decides: under torchrun it alone writes the cache
        if any(t is None for t in tables.values()):
            raise EdgekdError(f"rank {current_ranks().rank} cannot read the teacher cache {', '.join(str(p) for p in paths.values())} that rank 0 read",
                              "put the run folder on storage every rank sees")
        ui.log(f"teacher {teacher.name}: cache hit {', '.join(str(p) for p in paths.values())} ({time.time() - t0:.1f} s to load)")
        return TeacherCache(paths, tables, hit=True, seconds=time.time() - t0)

    def compute_and_write() -> float:
        tables.update(compute_teacher_tables(teacher, data.train, views, device)[0])
        for name, p in paths.items():
            with atomic_path(p) as tmp:
                torch.save({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": p.stem, "teacher": teacher.describe(), "augment": augment,
                            "layer": layers[name], "table": tables[name]}, tmp)
        return time.time() - t0

    seconds = on_main(compute_and_write)  # one rank runs the teacher; the others read its files (the same tables)
    if not current_ranks().is_main:
        tables = {name: _read_table(p, len(data.train), views) for name, p in paths.items()}
    n = len(data.train) * views
    ui.log(f"teacher {teacher.name}: cached {n:,} outputs in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} img/s) -> {', '.join(str(p) for p in paths.values())}")
    return TeacherCache(paths, tables, hit=False, seconds=seconds)


def _split_cache(teacher: Teacher, data: DataSet, split: Split, cache_dir: Path, device: torch.device) -> TeacherCache:
    """The teacher's logits on ``split`` (both flip views), cached like the training set's."""
    path = Path(cache_dir) / f"{cache_key(teacher, data, 'flip', None, split)}.pt"
    t0 = time.time()
    table = _read_table(path, len(split), 2)
    if share(table is not None):
        if table is None:
            raise EdgekdError(f"rank {current_ranks().rank} cannot read the teacher cache {path} that rank 0 read", "put the run folder on storage every rank sees")
        return TeacherCache({"logits": path}, {"logits": table}, hit=True, seconds=time.time() - t0)
    hook, teacher.hook = teacher.hook, None  # logits only: no feature loss runs on unlabeled images

    def compute_and_write() -> float:
        logits = compute_teacher_tables(teacher, split, 2, device)[0]["logits"]
        with atomic_path(path) as tmp:
            torch.save({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": path.stem, "teacher": teacher.describe(), "augment": "flip",
                        "layer": None, "table": logits}, tmp)
        return time.time() - t0

    try:
        seconds = on_main(compute_and_write)
    finally:
        teacher.hook = hook
    table = _read_table(path, len(split), 2)
    ui.log(f"teacher {teacher.name}: cached its outputs on {len(split):,} unlabeled images (2 views) in {seconds:.1f} s -> {path}")
    return TeacherCache({"logits": path}, {"logits": table}, hit=False, seconds=seconds)
