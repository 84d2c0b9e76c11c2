"""What a test needs from the machine, as skip markers: one definition each, so every test marked
with it skips (saying how to get Fashion-MNIST) where edgekd cannot find the data."""

from __future__ import annotations

import pytest

from edgekd.data import fashion_mnist_root
from edgekd.errors import EdgekdError


def have_fashion_mnist() -> bool:
    """True where edgekd finds Fashion-MNIST the way a build does ($EDGEKD_FASHION_MNIST or the Debian package's folder)."""
    try:
        fashion_mnist_root(None)
    except EdgekdError:
        return False
    return True


FMNIST_REASON = "needs Fashion-MNIST: apt-get install dataset-fashion-mnist (or set $EDGEKD_FASHION_MNIST)"
needs_fmnist = pytest.mark.skipif(not have_fashion_mnist(), reason=FMNIST_REASON)


def skip_without_fmnist() -> None:
    """For fixtures: a fixture cannot carry a marker, so the shared data fixtures skip their tests themselves."""
    if not have_fashion_mnist():
        pytest.skip(FMNIST_REASON)

