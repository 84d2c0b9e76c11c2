"""A torchvision data set goes through the image cache like every other source (issue 28): the
first run converts it once, a later run reads the cache and never builds the torchvision set."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from edgekd.data import fashion_mnist_root, load_dataset
from edgekd.data.store import Storage
from needs import have_fashion_mnist, needs_fmnist

pytestmark = needs_fmnist
FMNIST = Path(fashion_mnist_root(None)) if have_fashion_mnist() else None  # where edgekd finds it ($EDGEKD_FASHION_MNIST too)


def _idx_subset(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` records of a gzipped IDX file, written uncompressed (torchvision's raw MNIST layout)."""
    raw = gzip.open(src).read()
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    per = int(np.prod(shape[1:])) if dims > 1 else 1
    header = raw[:4] + struct.pack(f">{dims}I", n, *shape[1:])
    dst.write_bytes(header + raw[4 + 4 * dims : 4 + 4 * dims + n * per])


@pytest.fixture
def mnist_folder(tmp_path: Path) -> Path:
    """A local torchvision MNIST folder (real Fashion-MNIST pixels in MNIST's files): no download."""
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 300), ("t10k", 100)):
        _idx_subset(FMNIST / f"{split}-images-idx3-ubyte.gz", raw / f"{split}-images-idx3-ubyte", n)
        _idx_subset(FMNIST / f"{split}-labels-idx1-ubyte.gz", raw / f"{split}-labels-idx1-ubyte", n)
    return tmp_path / "tv"


def test_a_torchvision_set_is_converted_once_then_read_from_the_cache(mnist_folder, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    import torchvision.datasets as tvd

    storage = Storage(cache_dir=str(tmp_path / "cache"))
    first = load_dataset("mnist", str(mnist_folder), store_size=storage, val_fraction=0.1)
    assert len(first.train) + len(first.val) == 300 and len(first.test) == 100 and first.channels == 1
    direct = tvd.MNIST(str(mnist_folder), train=False, download=False)
    np.testing.assert_array_equal(first.test.take(slice(None)).numpy()[:, 0], direct.data.numpy())
    assert first.test.labels.tolist() == direct.targets.tolist() and first.classes == list(direct.classes)

    def refuse(*_a, **_k):
        raise AssertionError("a cache hit must not build the torchvision data set")

    monkeypatch.setattr(tvd.MNIST, "__init__", refuse)
    again = load_dataset("mnist", str(mnist_folder), store_size=storage, val_fraction=0.1)
    np.testing.assert_array_equal(again.test.take(slice(None)).numpy(), first.test.take(slice(None)).numpy())
    assert again.train.labels.tolist() == first.train.labels.tolist()
    (mnist_folder / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").touch()  # a changed file: converted again (and here refused)
    with pytest.raises(Exception, match="must not build"):
        load_dataset("mnist", str(mnist_folder), store_size=storage, val_fraction=0.1)
