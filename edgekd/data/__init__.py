"""The data: uint8 images decoded once into a cache file, splits that select rows of it, and batch
iterators that preprocess on the fly.

Why not a DataLoader decoding with PIL per image: on a 2-core machine that is the bottleneck. Every
image is decoded once at a fixed storage size into one uint8 array on disk (:mod:`~edgekd.data.store`),
and a batch reads only its rows. Preprocessing (resize, grey->RGB, normalisation) follows the
*model's* data config, timm-style, so one dataset feeds a 224-px RGB teacher and a 28-px grey
student alike.

Sources:
- ``fashion-mnist``: the four IDX files from Debian's ``dataset-fashion-mnist`` (offline).
- ``imagefolder``: ``root/<class>/<image>``; optional ``train/`` ``val/`` ``test/`` sub-folders.
- any torchvision dataset class name (``cifar10``, ``mnist``...) where it can be downloaded.

Modules: ``batches`` (splits, preprocessing, augmentation, the batch iterator), ``store`` (the
decoded-once cache), ``sources`` (Fashion-MNIST, ImageFolder, torchvision; ``load_dataset``),
``unlabeled`` (deployment-domain folders) and ``load`` (``load_data``: a recipe's ``data:`` section).
"""

from edgekd.data.batches import (Batch, DataSet, Preprocess, Split, augment_batch, calibration_images, eval_batch_size, iterate, num_batches,
                                 stratified_split)
from edgekd.data.load import load_data
from edgekd.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT, fashion_mnist_root, load_dataset, load_fashion_mnist_split, load_imagefolder

__all__ = ["Batch", "DataSet", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DEFAULT", "Preprocess", "Split", "augment_batch", "calibration_images", "eval_batch_size",
           "fashion_mnist_root", "iterate", "load_data", "load_dataset", "load_fashion_mnist_split", "load_imagefolder", "num_batches", "stratified_split"]
