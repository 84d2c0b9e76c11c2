"""The recipe's data: :func:`load_data` turns a ``data:`` section into a :class:`DataSet`, with the
deployment-domain folders beside it. Every stage and command that needs data calls this one."""

from __future__ import annotations

from edgekd import ui
from edgekd.config import DataConfig
from edgekd.data.batches import DataSet
from edgekd.data.sources import load_dataset
from edgekd.data.store import Storage
from edgekd.data.unlabeled import load_target_test, load_unlabeled


def load_data(cfg: DataConfig, seed: int, store_size: int = 64) -> DataSet:
    """The recipe's data set; an image folder stored at ``store_size`` px as ``cfg`` says (decoded once, cached).
    The deployment-domain folders (``unlabeled_root``, ``target_test_root``) are stored like the
    labeled images: an image folder's side, or the side of a data set's own images (28 px for
    Fashion-MNIST), and its channels."""
    storage = Storage(store_size, cfg.resize, cfg.cache_dir, cfg.decode_workers)
    data = load_dataset(cfg.dataset, cfg.root, cfg.val_fraction, seed, cfg.train_subset, cfg.test_subset, storage, cfg.test_fraction)
    if cfg.unlabeled_root or cfg.target_test_root:
        side = storage if cfg.dataset == "imagefolder" else Storage(data.train.image_shape[-1], cfg.resize, cfg.cache_dir, cfg.decode_workers)
        if cfg.unlabeled_root:
            data.unlabeled = load_unlabeled(cfg.unlabeled_root, side, data.channels)
        if cfg.target_test_root:
            data.target_test = load_target_test(cfg.target_test_root, data.classes, side, data.channels)
        ui.log(f"deployment domain: {len(data.unlabeled) if data.unlabeled is not None else 0:,} unlabeled images, "
               f"{len(data.target_test) if data.target_test is not None else 0:,} labeled target test images")
    return data
