"""Calibrator selection ('auto') scores on a bounded validation subset, so a 224 px export takes minutes."""

from __future__ import annotations

import torch

from edgekd.config import QuantizeConfig
from edgekd.data import Split
from edgekd.models import load_checkpoint
from edgekd.quantize import ptq as qstage


def _class_sorted_split(n_per_class: int = 300, classes: int = 10) -> Split:
    """An image folder's validation split: sorted by class, as folders are read."""
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.randint(0, 256, (len(labels), 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Split(images, labels)


def test_selection_split_is_bounded_fixed_and_covers_every_class():
    val = _class_sorted_split()
    cfg = QuantizeConfig(calibrator="auto", select_images=1000)
    a, b = qstage.selection_split(val, cfg), qstage.selection_split(val, cfg)
    assert len(a) == 1000 and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    counts = torch.bincount(a.labels, minlength=10)
    assert counts.min() >= 70, counts  # the first 1,000 of a class-sorted split would hold 4 classes
    assert len(qstage.selection_split(val, QuantizeConfig(calibrator="max", select_images=1000))) == len(val)  # one method: nothing to select
    assert qstage.selection_split(val, QuantizeConfig(calibrator="auto", select_images=5000)) is val


def test_auto_scores_every_calibrator_on_the_bounded_subset(pico_2000_ckpt, fmnist_2000, monkeypatch):
    """calibrate('auto') never evaluates the whole validation split: every score (FP32 and each method) is on select_images of it."""
    seen: list[int] = []
    real = qstage.top1_on

    def counting(model, split, classes):
        seen.append(len(split))
        return 0.0 if split is not None and hasattr(model, "edgekd_quant") else real(model, split, classes)  # max 'loses': all four are tried

    monkeypatch.setattr(qstage, "top1_on", counting)
    cfg = QuantizeConfig(calibrator="auto", select_images=60, calib_images=64, layout="openvino", weight_bits=8)
    model, tried = qstage.calibrate(load_checkpoint(pico_2000_ckpt), cfg, fmnist_2000)
    assert list(tried) == list(qstage.AUTO_CALIBRATORS) and len(fmnist_2000.val) > 60
    assert seen == [60] * (1 + len(qstage.AUTO_CALIBRATORS)), seen
    assert model.edgekd_quant["layout"] == "openvino"
