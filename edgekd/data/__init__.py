"""Datasets held in memory as uint8 tensors, and batch iterators that preprocess on the fly.

Why in memory: on a 2-core machine a PyTorch DataLoader with PIL decoding per image is the
bottleneck for small images. Fashion-MNIST (60k x 28 x 28) is 47 MB as uint8; an ImageFolder is
decoded once at a fixed storage size. Preprocessing (resize, grey->RGB, normalisation) follows the
*model's* data config, timm-style, so one dataset feeds a 224-px RGB teacher and a 28-px grey
student alike.

Sources:
- ``fashion-mnist``: the four IDX files from Debian's ``dataset-fashion-mnist`` (offline).
- ``imagefolder``: ``root/<class>/<image>``; optional ``train/`` ``val/`` ``test/`` sub-folders.
- any torchvision dataset class name (``cifar10``, ``mnist``...) where it can be downloaded.

Modules: ``batches`` (splits in memory, preprocessing, augmentation, the batch iterator) and
``sources`` (Fashion-MNIST, ImageFolder, torchvision; ``load_dataset``).
"""

from edgekd.data.batches import Batch, DataSet, Preprocess, Split, augment_batch, calibration_images, iterate, num_batches, stratified_split
from edgekd.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT, fashion_mnist_root, load_dataset, load_fashion_mnist_split, load_imagefolder

__all__ = ["Batch", "DataSet", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DEFAULT", "Preprocess", "Split", "augment_batch", "calibration_images",
           "fashion_mnist_root", "iterate", "load_dataset", "load_fashion_mnist_split", "load_imagefolder", "num_batches", "stratified_split"]
