"""Images from the deployment domain: a folder of unlabeled images (``data.unlabeled_root``) and
an optional labeled target-domain test folder (``data.target_test_root``).

Both are decoded once like the labeled image folders (:func:`edgekd.data.store.decoded_folder`:
one uint8 array on disk in ``data.cache_dir``, keyed by content) at the labeled data's
storage side and channel count, so the same :class:`~edgekd.data.Preprocess` feeds every split.

- The unlabeled folder may have any layout: every image file under it, in sub-folders too, is one
  image; folder names mean nothing. Its labels are -1 (``UNLABELED``): nothing may train on them.
- The target test folder is ``<class>/<image>`` with the training classes (a '/' in a class name,
  as Fashion-MNIST's "T-shirt/top", is written '_' in the folder name).
- Images of another channel count (RGB photos for a grey model, or grey ones for an RGB model) are
  converted to the labeled data's channels, and the log says so once per folder.

:class:`UnlabeledFeed` is the data source the domain-adaptation losses draw from: an endless
stream of shuffled, flip-augmented batches (two views per image, so a teacher's outputs on them
can be cached), sharded over the ranks like the labeled batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from edgekd import ui
from edgekd.data.batches import Batch, Split, iterate
from edgekd.data.sources import IMAGE_EXTENSIONS
from edgekd.data.store import Storage, decoded_folder
from edgekd.errors import EdgekdError

UNLABELED = -1
GREY_MODES = ("L", "1", "I;16", "I", "LA")


def folder_class_name(name: str) -> str:
    """A class name as a folder can hold it ('/' is a path separator)."""
    return name.replace("/", "_")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))


def _other_channels(files: list[Path], channels: int) -> int:
    """How many of the first 64 readable files have another channel count than ``channels``."""
    from PIL import Image, UnidentifiedImageError

    other = 0
    for p in files[:64]:
        try:
            with Image.open(p) as im:
                other += (1 if im.mode in GREY_MODES else 3) != channels
        except (OSError, UnidentifiedImageError):
            continue
    return other


def _decode(files: list[tuple[Path, int]], folder: Path, storage: Storage, channels: int, what: str) -> Split:
    store, rows, labels, skipped, _ = decoded_folder(files, folder, storage, channels)
    if not len(rows):
        raise EdgekdError(f"{what} {folder}: none of its {len(files)} image file(s) could be read", "check the files are valid images (PNG, JPEG, ...)")
    if skipped:
        ui.warn(f"{what} {folder}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
    other = _other_channels([p for p, _ in files], channels)
    if other:
        kind = "grey" if channels == 1 else "RGB"
        ui.log(f"{what} {folder}: images of another channel count (e.g. {other} of the first {min(64, len(files))}) are converted to {kind}, "
               "like the labeled data")
    return Split(store, torch.from_numpy(labels), torch.from_numpy(rows))


def load_unlabeled(root: str | Path, storage: Storage, channels: int) -> Split:
    """Every image under ``root`` (labels ``UNLABELED``), decoded once at ``storage`` with ``channels``."""
    folder = Path(root)
    if not folder.is_dir():
        raise EdgekdError(f"unlabeled image folder not found: {folder}", "pass --unlabeled DIR, a folder of images from the deployment domain")
    files = image_files(folder)
    if not files:
        raise EdgekdError(f"unlabeled image folder {folder} has no images", f"put image files in it (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return _decode([(p, UNLABELED) for p in files], folder, storage, channels, "unlabeled folder")


def load_target_test(root: str | Path, classes: list[str], storage: Storage, channels: int) -> Split:
    """A labeled target-domain test folder ``root/<class>/<image>`` whose classes are the training classes."""
    folder = Path(root)
    if not folder.is_dir():
        raise EdgekdError(f"target test folder not found: {folder}", "pass data.target_test_root=DIR, laid out as DIR/<class>/<image>")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {folder_class_name(c): i for i, c in enumerate(classes)}
    unknown = [d for d in found if d not in index]
    if unknown or not found:
        raise EdgekdError(f"target test folder {folder} has classes {', '.join(unknown[:5]) or '(none)'} that are not training classes",
                          f"name its sub-folders after the training classes: {', '.join(list(index)[:10])}")
    files = [(p, index[d]) for d in found for p in image_files(folder / d)]
    if not files:
        raise EdgekdError(f"target test folder {folder} has no images", "put images in DIR/<class>/")
    return _decode(files, folder, storage, channels, "target test folder")


def split_fingerprint(split: Split) -> str:
    """Cheap identity of a split (size, shape, a sample of bytes), for cache keys."""
    import hashlib

    h = hashlib.sha256(str((len(split), *split.image_shape)).encode())
    h.update(split.take(slice(None, None, max(1, len(split) // 64))).numpy().tobytes())
    return h.hexdigest()[:16]


class UnlabeledFeed:
    """Endless flip-augmented batches of ``batch_size`` unlabeled images, reshuffled every pass,
    each rank taking its shard (as :func:`edgekd.data.iterate` does for labeled data)."""

    def __init__(self, split: Split, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if len(split) < batch_size * world:
            batch_size = max(1, len(split) // world)
        self.split, self.batch_size, self.seed, self.rank, self.world = split, batch_size, seed, rank, world
        self.passes = 0
        self._it: Iterator[Batch] = iter(())

    def next(self) -> Batch:
        for _ in range(2):
            for batch in self._it:
                if len(batch.labels) == self.batch_size:
                    return batch
            self._it = iterate(self.split, self.batch_size, shuffle=True, seed=self.seed + 1_000_003, epoch=self.passes, augment="flip",
                               rank=self.rank, world=self.world)
            self.passes += 1
        raise EdgekdError("the unlabeled folder gives no batch", "add images to data.unlabeled_root")
