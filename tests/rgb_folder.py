"""A small RGB ImageFolder made from real photos, for the "your own small data set" tests and benchmark.

Fashion-MNIST's trouser, bag and sneaker photos (real images, three visually distinct classes),
tinted into RGB on a coloured background and resized to mixed sizes (40 to 120 px) and formats
(PNG, JPEG), as a user's folder would be. Generated on demand: no data is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {"trouser": 1, "bag": 8, "sneaker": 7}  # Fashion-MNIST label of each class


def make_rgb_folder(root: Path, per_class: int = 120, seed: int = 0) -> Path:
    """Write ``root/<class>/<n>.(png|jpg)``; returns ``root``."""
    from edgekd.data import fashion_mnist_root, load_fashion_mnist_split

    train = load_fashion_mnist_split(fashion_mnist_root(None), "train")
    rng = np.random.default_rng(seed)
    for name, label in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(train.labels.numpy() == label)
        for i, k in enumerate(rng.choice(idx, per_class, replace=False)):
            grey = train.images[k, 0].numpy().astype(np.float32) / 255.0
            fg, bg = rng.uniform(0.3, 1.0, 3), rng.uniform(0.0, 0.35, 3)
            rgb = (grey[..., None] * fg + (1 - grey[..., None]) * bg) * 255
            side = int(rng.integers(40, 121))
            img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").resize((side, int(side * rng.uniform(0.8, 1.25))), Image.BILINEAR)
            img.save(folder / f"{i:04d}.{'jpg' if i % 3 == 0 else 'png'}")
    return root
