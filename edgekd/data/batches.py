"""Images in memory (uint8), their splits, preprocessing that follows the model's data config,
and the batch iterator with its augmentation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from edgekd.errors import EdgekdError


class Split:
    """Labels (N,) int64 and their uint8 images: rows of ``source``, a (M, C, H, W) tensor in memory
    or an on-disk :class:`edgekd.data.store.ImageStore` (``rows`` None: row i is image i).
    Splitting and subsetting select rows and copy no image; ``take`` copies out only a batch."""

    def __init__(self, images, labels: torch.Tensor, rows: torch.Tensor | None = None):
        self.source, self.labels, self.rows = images, labels, rows

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.source.shape[1:])

    def take(self, idx) -> torch.Tensor:
        """uint8 images (B, C, H, W) at positions ``idx`` (a slice, a list or an index tensor) of this split."""
        idx = torch.arange(len(self))[idx] if isinstance(idx, slice) else torch.as_tensor(idx, dtype=torch.long)
        rows = self.rows[idx] if self.rows is not None else idx
        if isinstance(self.source, torch.Tensor):
            return self.source[rows]
        return torch.from_numpy(self.source.take(rows.numpy()))

    @property
    def images(self) -> torch.Tensor:
        """Every image of the split, in memory (for small splits: a probe, a check batch)."""
        if self.rows is None and isinstance(self.source, torch.Tensor):
            return self.source
        return self.take(slice(None))

    def select(self, positions: torch.Tensor) -> "Split":
        rows = self.rows[positions] if self.rows is not None else positions
        return Split(self.source, self.labels[positions], rows)

    def subset(self, n: int | None) -> "Split":
        return self if n is None or n >= len(self) else self.select(torch.arange(n))


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, C, H, W), augmented
    labels: torch.Tensor
    indices: torch.Tensor  # positions in the split (for cached teacher outputs)
    flipped: torch.Tensor  # bool (B,), True where the image was mirrored
    cropped: bool  # True when a random crop was applied (teacher outputs not cacheable)


@dataclass
class DataSet:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    source: str = ""
    info: dict = field(default_factory=dict)
    unlabeled: Split | None = None  # images from the deployment domain, no labels (edgekd.data.unlabeled)
    target_test: Split | None = None  # labeled images from the deployment domain, for evaluation only

    @property
    def channels(self) -> int:
        return int(self.train.image_shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """Cheap identity of the data actually used (sizes + a sample of bytes), for cache keys."""
        import hashlib

        h = hashlib.sha256(self.name.encode())
        for split in (self.train, self.val, self.test):
            h.update(str((len(split), *split.image_shape)).encode())
            h.update(split.take(slice(None, None, max(1, len(split) // 64))).numpy().tobytes())
            h.update(split.labels.numpy().tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: the same fields timm keeps in ``pretrained_cfg``."""

    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "channels": self.channels, "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["input_size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bilinear"))

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalised float (N, channels, input_size, input_size)."""
        x = images_u8.float().div_(255.0)
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
                x = (x[:, :3] * w).sum(1, keepdim=True)
            else:
                raise EdgekdError(f"cannot map {x.shape[1]}-channel images to {self.channels} channels")
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation, align_corners=False)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def augment_batch(images_u8: torch.Tensor, mode: str, generator: torch.Generator, pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop (zero pad, then crop back) and horizontal flip on a uint8 batch.

    Returns the images and the flip mask: with ``mode='flip'`` the augmentation has only two
    views per image, so a teacher's logits for both can be cached (see distill.py).
    """
    if mode == "none":
        return images_u8, torch.zeros(images_u8.shape[0], dtype=torch.bool)
    n, _, h, w = images_u8.shape
    out = images_u8
    if mode == "crop-flip":
        p = pad if pad is not None else max(1, round(h / 14))
        padded = F.pad(images_u8, (p, p, p, p))
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out = out.clone() if out is images_u8 else out
    out[flip] = out[flip].flip(-1)
    return out, flip


def iterate(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: str = "none",
    rank: int = 0,
    world: int = 1,
) -> Iterator[Batch]:
    """Yield batches (the last may be smaller). With ``world > 1`` each rank gets its shard of
    the same permutation."""
    n = len(split)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world > 1:
        per_rank = n // world
        order = order[: per_rank * world].view(per_rank, world)[:, rank].contiguous()
    aug_gen = torch.Generator().manual_seed(seed * 7_919 + epoch * 31 + rank)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        images, flipped = augment_batch(split.take(idx), augment, aug_gen)
        yield Batch(images, split.labels[idx], idx, flipped, augment == "crop-flip")


EVAL_PIXELS = 256 * 64 * 64  # images x pixels per inference batch: 256 images up to 64 px, fewer above


def eval_batch_size(side: int) -> int:
    """Inference batch (evaluation, teacher outputs, reference logits) for ``side``-px inputs. A fixed
    256 at 128 px held 4x the activations of the training batch of 64 and set a build's peak memory
    (benchmarks/data_scale.py); constant pixels per batch keep inference under training's memory
    at every resolution (256 images at 64 px, 64 at 128, 20 at 224; 8 at least)."""
    return max(8, min(256, EVAL_PIXELS // (side * side)))


def num_batches(n: int, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
    per_rank = n // world if world > 1 else n
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def _held_per_class(sizes: list[int], fraction: float, total: int) -> list[int]:
    """How many images of each class to hold out: ``fraction`` of each, rounded down, and the
    rest of ``total`` to the classes with the largest remainders (largest-remainder rounding), so
    10 images in 2 classes at 10% hold out 1, not 0 (each class's own 0.5 rounds to nothing)."""
    exact = [s * fraction for s in sizes]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: max(0, total - sum(counts))]:
        counts[i] = min(sizes[i], counts[i] + 1)
    return counts


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held out): ``fraction`` of every class held out, so a small or imbalanced data set
    keeps each class in both parts (a plain random split of 300 images can leave a class out)."""
    total = round(len(split) * fraction)
    if total == 0:
        return split, split.select(torch.arange(0))
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(split.labels).tolist()
    members = [torch.nonzero(split.labels == c).flatten() for c in classes]
    held, rest = [], []
    for idx, n in zip(members, _held_per_class([len(m) for m in members], fraction, total)):
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[:n])
        rest.append(idx[n:])
    h, r = torch.cat(held).sort().values, torch.cat(rest).sort().values
    return split.select(r), split.select(h)


def calibration_images(split: Split, n: int, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of uint8 images for INT8 calibration."""
    n = min(n, len(split))
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.take(idx)
