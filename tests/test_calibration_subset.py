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


def test_one_histogram_pass_gives_each_method_the_ranges_it_gets_alone(pico_2000_ckpt, fmnist_2000):
    """'auto' collects the activation histogram once and derives the MSE, percentile and entropy ranges
    from it (one pass instead of three, and one max calibration instead of four): each method's ranges
    equal those of a calibration with that method alone, and the max ranges are left in place."""
    from edgekd.data import calibration_images
    from edgekd.models import model_from_checkpoint
    from edgekd.quantize import activation_quantizers, forward_loop_over, quantize_model
    from edgekd.quantize.calibrate import histogram_amaxes

    ckpt = load_checkpoint(pico_2000_ckpt)
    calib = calibration_images(fmnist_2000.train, 64, 0)
    cfg = QuantizeConfig(calib_images=64, layout="tensorrt", weight_bits=8)

    def calibrated(method: str):
        fp32 = model_from_checkpoint(ckpt)
        model = quantize_model(fp32, cfg.model_copy(update={"calibrator": method}), calib, fp32.preprocess)
        return model, list(activation_quantizers(model).values())

    model, quantizers = calibrated("max")
    maxes = [q.amax.clone() for q in quantizers]
    ranges = histogram_amaxes(quantizers, model, forward_loop_over(calib, model.preprocess), ("mse", "percentile", "entropy"))
    assert [q.amax for q in quantizers] == maxes and all(q.is_enabled and not q._if_calib for q in quantizers)
    for method, amaxes in ranges.items():
        alone = [float(q.amax) for q in calibrated(method)[1]]
        assert [float(a) for a in amaxes] == alone, method
        assert alone != [float(m) for m in maxes], f"{method} gives max's ranges: the comparison proves nothing"
