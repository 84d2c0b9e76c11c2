"""A user's small data set: a few hundred RGB photos of mixed sizes in 3 classes, `edgekd build` on it.

The budget must fit the data (issue 13): each training stage sizes its epochs from the number of
images and the recipe's ``min_steps``, says so, and the report says how sure its accuracy figure
is on a test set this small. The default build itself (EfficientNet-Lite0 teacher, >= 95% in at
most 5 minutes on 2 cores) takes 1.5-3 minutes, so it is a benchmark with its goal checked:
``python benchmarks/build_benchmark.py --only small-folder`` (benchmarks/build_results_small_folder.md).
Here the same route runs with pico networks and smaller ``min_steps``.
"""

import pytest

from cli_helpers import json_out, run_inprocess
from rgb_folder import make_rgb_folder
from needs import needs_fmnist

pytestmark = [pytest.mark.slow, needs_fmnist]

SMALL_STEPS = {"teacher.model": "pico_cnn", "teacher.pretrained": "none", "teacher.train.min_steps": 48, "student.model": "pico_cnn",
               "student.train.min_steps": 48, "quantize.train.min_steps": 16, "quantize.calib_images": 64, "bench.runs": 10, "bench.warmup": 1,
               "bench.batches": "[1]"}


def test_build_on_a_small_rgb_folder_sizes_every_stage_to_the_data(tmp_path):
    folder = make_rgb_folder(tmp_path / "photos", per_class=120)
    sets = [arg for key, value in SMALL_STEPS.items() for arg in ("--set", f"{key}={value}")]
    res = json_out(run_inprocess("build", "--target", "x86-cpu", "--dataset", "imagefolder", "--data-root", folder, *sets, "--out", tmp_path / "run",
                                 "--json"))
    report = res["report"]
    assert report["test_images"] == 72  # 20% of 360, stratified: 24 per class
    assert any("test set has 72 images" in n for n in report["notes"])  # how sure the figure is
    assert report["accuracy"][-1]["ci95"] > 0.01
    # 259 training images at batch 32 are 8 steps an epoch: min_steps 48 asks for 6 epochs, where the recipe's own were 1
    sized = {n.split(":")[0]: n for n in report["notes"] if "training images:" in n}
    assert set(sized) >= {"teacher", "control", "distill", "qad"}, report["notes"]
    assert "259 training images: 6 epochs of 8 steps at batch 32" in sized["teacher"] and "min_steps 48" in sized["teacher"], sized["teacher"]
    assert "2 epochs of 8 steps" in sized["qad"], sized["qad"]
    assert res["accuracy"] >= 0.8, report["accuracy"]  # three visually distinct classes: pico_cnn learns them in 48 steps
