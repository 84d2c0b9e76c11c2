"""Where a data set comes from: Fashion-MNIST's IDX files (offline, Debian's
``dataset-fashion-mnist``), an ImageFolder decoded once at a fixed storage size, or a torchvision
data set; ``load_dataset`` makes the train/val/test splits."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgekd import ui
from edgekd.errors import EdgekdError
from edgekd.data.batches import DataSet, Split, stratified_split
from edgekd.data.store import Storage, decoded_folder, stored_array, stored_with_meta


FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "EDGEKD_FASHION_MNIST"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


# ----------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> torch.Tensor:
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            raw = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad IDX magic")
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
        return data.view(*dims)
    except (OSError, ValueError, RuntimeError, EOFError, struct.error) as exc:
        raise EdgekdError(f"cannot read IDX file {path}: {exc}", "the file is corrupt; reinstall the dataset (apt-get install --reinstall dataset-fashion-mnist)") from exc


def fashion_mnist_root(root: str | None) -> Path:
    candidates = [root] if root else [os.environ.get(FASHION_MNIST_ENV), FASHION_MNIST_DEFAULT]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair):
            return Path(c)
    where = root or f"${FASHION_MNIST_ENV} or {FASHION_MNIST_DEFAULT}"
    raise EdgekdError(
        f"Fashion-MNIST not found at {where}",
        "install it with `apt-get install -y dataset-fashion-mnist`, or pass --data-root / set "
        f"{FASHION_MNIST_ENV} to a folder holding the four *-idx?-ubyte.gz files",
    )


def load_fashion_mnist_split(root: Path, which: str) -> Split:
    img_file, lbl_file = FASHION_MNIST_FILES[which]
    images = _read_idx(root / img_file)
    labels = _read_idx(root / lbl_file).long()
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise EdgekdError(f"Fashion-MNIST files in {root} disagree in shape", "reinstall the dataset")
    return Split(images.unsqueeze(1).contiguous(), labels)


def _stored_fashion_mnist(base: Path, which: str, storage: Storage) -> Split:
    """One split's images decompressed once into the image cache and read from there (labels: 60 KB, read each time)."""
    img_file, lbl_file = FASHION_MNIST_FILES[which]
    store, _ = stored_array(f"fashion-mnist:{which}", [base / img_file], lambda: load_fashion_mnist_split(base, which).images.numpy(), storage)
    labels = _read_idx(base / lbl_file).long()
    if store.shape[0] != labels.shape[0]:
        raise EdgekdError(f"Fashion-MNIST files in {base} disagree in shape", "reinstall the dataset")
    return Split(store, labels)


# ----------------------------------------------------------------------------- ImageFolder
def _list_classes(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; os.walk reads each directory once (no stat per file)."""
    found = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return [Path(p) for p in sorted(found)]


def _load_folder(folder: Path, classes: Sequence[str], storage: Storage, channels: int | None) -> tuple[Split, int, list[str], dict]:
    """Every image as (channels, S, S) uint8, decoded once into the cache (:mod:`edgekd.data.store`) and
    read from the cache file; returns the split, channel count, skipped files and how the data was made ready."""
    from PIL import Image, UnidentifiedImageError

    files: list[tuple[Path, int]] = []
    for ci, cname in enumerate(classes):
        cdir = folder / cname
        if cdir.is_dir():
            files += [(p, ci) for p in _image_files(cdir)]
    if not files:
        raise EdgekdError(f"no images found in {folder}", f"put images in {folder}/<class name>/ (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if channels is None:
        modes = []
        for p, _ in files[:64]:
            try:
                with Image.open(p) as im:
                    modes.append(im.mode)
            except (OSError, UnidentifiedImageError):
                continue
        channels = 1 if modes and all(m in ("L", "1", "I;16", "I") for m in modes) else 3
    store, rows, labels, skipped, info = decoded_folder(files, folder, storage, channels)
    if not len(rows):
        raise EdgekdError(f"none of the {len(files)} images in {folder} could be read", "check the files are valid images")
    return Split(store, torch.from_numpy(labels), torch.from_numpy(rows)), channels, skipped, info


def load_imagefolder(root: str | None, store_size: int | Storage = 64) -> tuple[dict[str, Split], list[str], dict]:
    storage = store_size if isinstance(store_size, Storage) else Storage(store_size)
    if not root:
        raise EdgekdError("dataset 'imagefolder' needs a folder", "pass --data-root DIR (DIR/<class>/<image>)")
    base = Path(root)
    if not base.is_dir():
        raise EdgekdError(f"dataset folder not found: {base}", "check the path passed as --data-root")
    has_splits = (base / "train").is_dir()
    train_dir = base / "train" if has_splits else base
    classes = _list_classes(train_dir)
    if not classes:
        raise EdgekdError(f"{train_dir} has no class sub-folders", "lay the data out as DIR/<class name>/<image files>")
    if len(classes) < 2:
        raise EdgekdError(f"{train_dir} has only one class ({classes[0]})", "a classifier needs at least two class folders")
    splits: dict[str, Split] = {}
    train, channels, skipped, ready = _load_folder(train_dir, classes, storage, None)
    splits["train"] = train
    for name in ("val", "test"):
        if has_splits and (base / name).is_dir():
            split, _, sk, _ = _load_folder(base / name, classes, storage, channels)
            splits[name] = split
            skipped += sk
    return splits, classes, {"skipped_files": skipped, "store_size": storage.size, "resize": storage.resize, "cache": ready}


# ----------------------------------------------------------------------------- torchvision
def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def load_torchvision(name: str, root: str | None, storage: Storage | None = None) -> tuple[dict[str, Split], list[str]]:
    """A torchvision data set (downloaded into ``root`` the first time), converted once into the
    image cache like every other source: a later run reads the cache and never unpickles the set."""
    import torchvision.datasets as tvd  # torchvision: only for this source

    lookup = {k.lower().replace("_", "").replace("-", ""): k for k in dir(tvd) if isinstance(getattr(tvd, k), type)}  # MNIST, not the module mnist
    key = name.lower().replace("_", "").replace("-", "")
    if key not in lookup:
        raise EdgekdError(f"unknown dataset '{name}'", "use 'fashion-mnist', 'imagefolder' (with --data-root) or a torchvision dataset name such as cifar10")
    cls = getattr(tvd, lookup[key])
    folder = Path(root or Path.home() / ".cache" / "edgekd" / "datasets")
    out, classes = {}, []
    try:
        if not _files_under(folder):
            cls(str(folder), train=True, download=True)  # the files the cache key is made of
        for split, train in (("train", True), ("test", False)):
            store, extra, _ = stored_with_meta(f"torchvision:{lookup[key]}:{split}", _files_under(folder), lambda: _torchvision_arrays(cls, folder, train),
                                               storage or Storage())
            out[split] = Split(store, torch.tensor(extra["labels"], dtype=torch.long))
            classes = extra["classes"]
    except EdgekdError:
        raise
    except Exception as exc:  # noqa: BLE001 - any download/parse failure
        raise EdgekdError(f"could not load torchvision dataset '{name}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", "check the network or pass a local --data-root") from exc
    return out, classes


def _torchvision_arrays(cls, folder: Path, train: bool) -> tuple[np.ndarray, dict]:
    """(N, C, H, W) uint8 images and {labels, classes} of one split, for the cache."""
    ds = cls(str(folder), train=train, download=True)
    data = np.asarray(ds.data, dtype=np.uint8)
    data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    labels = [int(t) for t in ds.targets]
    return data, {"labels": labels, "classes": list(getattr(ds, "classes", [str(i) for i in range(max(labels) + 1)]))}


def load_dataset(
    dataset: str = "fashion-mnist",
    root: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    store_size: int | Storage = 64,
    test_fraction: float = 0.2,
) -> DataSet:
    """Load a dataset with deterministic stratified splits (same seed, same split). A data set
    without its own test split (an ImageFolder of one folder) gets ``test_fraction`` of it as a
    test set that training and model selection never see."""
    info: dict = {}
    key = dataset.lower()
    storage = store_size if isinstance(store_size, Storage) else Storage(store_size)
    if key in ("fashion-mnist", "fashion_mnist", "fmnist"):
        base = fashion_mnist_root(root)
        splits = {which: _stored_fashion_mnist(base, which, storage) for which in ("train", "test")}
        classes, source, name = list(FASHION_MNIST_CLASSES), str(base), "fashion-mnist"
    elif key == "imagefolder":
        splits, classes, info = load_imagefolder(root, storage)
        source, name = str(root), f"imagefolder:{Path(root).name}"
        if info["skipped_files"]:
            ui.warn(f"skipped {len(info['skipped_files'])} unreadable image(s) in {root}, e.g. {info['skipped_files'][0]}")
    else:
        splits, classes = load_torchvision(dataset, root, storage)
        source, name = root or "torchvision", dataset
    train = splits["train"]
    test = splits.get("test")
    if test is None:
        train, test = stratified_split(train, test_fraction, seed + 1)
        info["test_split_from_train"] = test_fraction
    if "val" in splits:
        val = splits["val"]
    else:
        train, val = stratified_split(train, val_fraction, seed)
    if len(train) == 0:
        raise EdgekdError(f"dataset {name} has no training images", "check the dataset folder")
    return DataSet(name, classes, train.subset(train_subset), val.subset(test_subset), test.subset(test_subset), source, info)
