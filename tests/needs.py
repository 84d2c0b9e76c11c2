"""What a test needs from the machine, as skip markers: one definition each, so every test that
needs Fashion-MNIST skips (with how to get it) instead of erroring where it is absent."""

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


needs_fmnist = pytest.mark.skipif(not have_fashion_mnist(), reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")


def skip_without_fmnist() -> None:
    """For session fixtures that load Fashion-MNIST: every test using them skips rather than errors."""
    if not have_fashion_mnist():
        pytest.skip("needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
