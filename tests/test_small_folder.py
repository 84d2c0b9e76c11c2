"""A user's small data set, default settings: a few hundred RGB photos of mixed sizes in 3 classes.

The budget must fit the data (issue 13): the default build, with nothing tuned, reaches >= 95% on
the held-out test images within 5 minutes on 2 cores, and says how sure that figure is.
"""

import time

import pytest

from cli_helpers import json_out, run_cli
from rgb_folder import make_rgb_folder
from needs import needs_fmnist

pytestmark = [pytest.mark.slow, needs_fmnist]


def test_default_build_on_a_small_rgb_folder(tmp_path):
    folder = make_rgb_folder(tmp_path / "photos", per_class=120)
    t0 = time.time()
    res = json_out(run_cli("build", "--target", "x86-cpu", "--dataset", "imagefolder", "--data-root", folder, "--out", tmp_path / "run", "--json",
                           timeout=900))
    wall = time.time() - t0
    report = res["report"]
    assert report["test_images"] == 72  # 20% of 360, stratified: 24 per class
    assert res["accuracy"] >= 0.95, report["accuracy"]
    assert wall <= 300, f"{wall:.0f} s"
    assert any("test set has 72 images" in n for n in report["notes"])  # how sure the figure is
    assert any("training images:" in n and "epochs of" in n for n in report["notes"])  # the budget grew to fit the data, and says so
    assert report["accuracy"][-1]["ci95"] > 0.01
