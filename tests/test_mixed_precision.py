"""Accuracy-aware INT8 (issue 14): per-layer sensitivity, the accuracy budget, mixed-precision export.

Real data (Fashion-MNIST subsets), a really trained pico_cnn, real onnxruntime sessions. A layer is
"broken" for INT8 by shrinking its weight quantizer's range so INT8 clips its weights: FP32 is
untouched, and only that layer's quantization hurts, so the ranking has a known right answer.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from cli_helpers import assert_one_line_error, run_inprocess
from edgekd.config import DataConfig, QuantizeConfig, TrainConfig
from edgekd.data import calibration_images
from edgekd.errors import EdgekdError
from edgekd.export import check_ort_cpu_fusion, check_tensorrt_readiness, confirm_on_export, export_int8_ort, export_int8_tensorrt, ort_logits
from edgekd.data import load_data
from edgekd.models import load_checkpoint, model_from_checkpoint, save_checkpoint
from edgekd.quantize import (fit_accuracy_budget, float_layers_of, load_quantized, measure_sensitivity, quantize_model, quantized_layers, run_qad,
                             save_quantized, set_float_layers)
from edgekd.quantize.sensitivity import score_without_quantizers
from edgekd.quantize.ptq import top1_on
from edgekd.train import cross_entropy_loss
from edgekd.quantize import for_target, QadJob
from pathlib import Path
from edgekd.targets import host_arch
from edgekd.stage_context import StageContext

BROKEN = "features.2.0"  # pico_cnn's middle conv


def _quantized(pico_2000_ckpt, fmnist_2000, layout="tensorrt"):
    model = model_from_checkpoint(pico_2000_ckpt)
    return quantize_model(model, QuantizeConfig(layout=layout), calibration_images(fmnist_2000.train, 256, 0), model.preprocess)


def _break(qmodel, layer=BROKEN, factor=40.0):
    """INT8 clips this layer's weights at 1/factor of their range; FP32 is unchanged."""
    wq = dict(qmodel.named_modules())[layer].weight_quantizer
    wq.amax = wq.amax / factor


def _score(fmnist_2000):
    return lambda m: top1_on(m, fmnist_2000.val, fmnist_2000.classes)


def test_pico_layers_are_named_by_module_path(pico_2000_ckpt, fmnist_2000):
    q = _quantized(pico_2000_ckpt, fmnist_2000)
    assert BROKEN in quantized_layers(q) and quantized_layers(q)[-1] == "head"


def test_float_layers_are_reversible_and_unknown_names_refused(pico_2000_ckpt, fmnist_2000):
    q = _quantized(pico_2000_ckpt, fmnist_2000)
    x = q.preprocess(fmnist_2000.test.images[:64])
    with torch.no_grad():
        full = q(x)
        set_float_layers(q, [quantized_layers(q)[0]])
        mixed = q(x)
        set_float_layers(q, [])
        again = q(x)
    assert not torch.equal(full, mixed)
    assert torch.equal(full, again)
    with pytest.raises(EdgekdError, match="no quantized layer named 'nope'"):
        set_float_layers(q, ["nope"])


def test_sensitivity_ranks_the_broken_layer_first(pico_2000_ckpt, fmnist_2000):
    q = _quantized(pico_2000_ckpt, fmnist_2000)
    _break(q)
    sens = measure_sensitivity(q, _score(fmnist_2000), len(fmnist_2000.val))
    assert sens.ranking()[0] == BROKEN, [(r.layer, r.float_gain) for r in sens.layers]
    top = sens.layers[0]
    assert top.float_gain > 5.0 and top.alone_drop > 5.0, top  # points
    assert all(r.float_gain < top.float_gain for r in sens.layers[1:])
    assert float_layers_of(q) == []  # measuring leaves the model as it was


def test_budget_search_stops_at_the_first_fit_and_reports_a_miss(pico_2000_ckpt, fmnist_2000):
    q = _quantized(pico_2000_ckpt, fmnist_2000)
    _break(q)
    score = _score(fmnist_2000)
    fp32 = score_without_quantizers(q, score)
    ranking = measure_sensitivity(q, score, len(fmnist_2000.val), alone=False).ranking()
    set_float_layers(q, [BROKEN])
    fixed_drop = 100 * (fp32 - score(q))
    set_float_layers(q, [])
    search = fit_accuracy_budget(q, ranking, score, fp32, fixed_drop + 0.01)
    assert search.met and search.float_layers == [BROKEN] and float_layers_of(q) == [BROKEN]
    assert len(search.steps) == 2 and search.steps[0]["drop_points"] > fixed_drop + 0.01
    impossible = fit_accuracy_budget(q, ranking, score, fp32 + 0.5, 0.0)  # 50 points above FP32: nothing fits
    assert not impossible.met
    assert len(impossible.float_layers) <= len(quantized_layers(q)) // 2
    best = max(impossible.steps, key=lambda s: s["top1"])["top1"]
    assert score(q) == pytest.approx(best)  # the model is left with the best set found


def test_budget_search_takes_out_a_layer_that_later_ones_made_unneeded(pico_2000_ckpt, fmnist_2000):
    """Forward search keeps A (it helped) then B (it fitted); B alone fits too, so A goes back to INT8.
    The score is a table over float sets: what is under test is the search, not a network."""
    q = _quantized(pico_2000_ckpt, fmnist_2000)
    a, b = quantized_layers(q)[:2]
    table = {(): 0.50, (a,): 0.60, (a, b): 0.90, (b,): 0.85}
    score = lambda m: table[tuple(sorted(float_layers_of(m), key=[a, b].index))]  # noqa: E731
    search = fit_accuracy_budget(q, [a, b], score, 0.90, 10.0)
    assert search.met and search.float_layers == [b] and float_layers_of(q) == [b] and search.top1 == 0.85
    assert [(s.get("tried"), s.get("removed"), s["kept"]) for s in search.steps] == [(None, None, True), (a, None, True), (b, None, True),
                                                                                      (None, b, False), (None, a, True)]
    pinned = fit_accuracy_budget(q, [a, b], score, 0.90, 10.0, pinned=[a])  # a layer pinned by hand is never taken out
    assert pinned.float_layers == [a, b]


def test_a_layer_back_in_int8_gets_the_range_of_its_own_weights(pico_2000_ckpt, fmnist_2000):
    from edgekd.quantize.sensitivity import refresh_weight_ranges

    q = _quantized(pico_2000_ckpt, fmnist_2000)
    quantizer = dict(q.named_modules())[BROKEN].weight_quantizer
    calibrated = quantizer.amax.clone()
    _break(q)
    refresh_weight_ranges(q, [BROKEN])
    assert torch.allclose(quantizer.amax, calibrated)  # max calibration's per-channel range, from the weights alone


def test_after_retraining_unneeded_float_layers_go_back_to_int8(outlier_ckpt, tmp_path):
    """The mixed model keeps BROKEN (activation outlier at its input) and the head in float; the head
    is not needed for the budget, so it goes back to INT8 and the checkpoint says so; BROKEN stays."""
    from types import SimpleNamespace

    from edgekd.quantize.budget import retry_in_int8
    from edgekd.quantize.qad import QadPass, QadRun

    small = load_data(DataConfig(train_subset=800, test_subset=200), 0)
    model = model_from_checkpoint(outlier_ckpt)
    q = quantize_model(model, QuantizeConfig(layout="tensorrt"), calibration_images(small.train, 256, 0), model.preprocess, [BROKEN, "head"])
    score = lambda m: top1_on(m, small.val, small.classes)  # noqa: E731
    fp32, mixed_val = score_without_quantizers(q, score), score(q)
    set_float_layers(q, [BROKEN])
    broken_only = score(q)
    set_float_layers(q, [])
    full_int8 = score(q)
    assert full_int8 < broken_only - 0.01, "the test needs BROKEN to matter"
    set_float_layers(q, [BROKEN, "head"])
    budget = 100 * (fp32 - broken_only) + 0.01
    save_quantized(tmp_path / "best.pt", q, small.classes)
    job = QadRun({}, str(outlier_ckpt), QuantizeConfig(max_accuracy_drop=budget, layout="tensorrt"), small, lambda m: (cross_entropy_loss(), None))
    mixed = QadPass(SimpleNamespace(best_path=tmp_path / "best.pt"), q, fp32, 0.0, 0.0, mixed_val, False)
    after, steps = retry_in_int8(job, mixed)
    assert [(s["removed"], s["kept"]) for s in steps] == [("head", True), (BROKEN, False)]
    assert float_layers_of(after.model) == [BROKEN] and after.val == pytest.approx(broken_only, abs=0.006)  # head's range refreshed: one image may move
    assert float_layers_of(load_quantized(tmp_path / "best.pt")) == [BROKEN]


def test_mixed_tensorrt_graph_is_ready_for_the_quantized_part(pico_2000_ckpt, fmnist_2000, tmp_path):
    q = _quantized(pico_2000_ckpt, fmnist_2000, "tensorrt")
    set_float_layers(q, [BROKEN])
    path = export_int8_tensorrt(q, tmp_path / "m.onnx", q.preprocess)
    proto = onnx.load(str(path))
    rep = check_tensorrt_readiness(proto, [BROKEN])
    assert rep.ok, rep.errors
    assert rep.kept_float == [BROKEN] and len(rep.quantized_ops) == len(quantized_layers(q)) - 1
    unaware = check_tensorrt_readiness(proto)  # without being told, a float conv is an error
    assert not unaware.ok and any("neither input is quantized" in e for e in unaware.errors)
    x = q.preprocess(fmnist_2000.test.images[:128])
    with torch.no_grad():
        ref = q(x).numpy()
    got = ort_logits(path, x.numpy(), exact_qdq=True)
    assert np.abs(got - ref).max() < 0.05 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.99  # a rounding tie may move one code


def test_mixed_ort_cpu_file_runs_the_float_layer_in_float(pico_2000_ckpt, fmnist_2000, tmp_path):
    q = _quantized(pico_2000_ckpt, fmnist_2000, "ort-cpu")
    set_float_layers(q, [BROKEN])
    path, _ = export_int8_ort(q, tmp_path / "m.onnx", q.preprocess, fmnist_2000.train.images[:256])
    rep = check_ort_cpu_fusion(path, [BROKEN])
    assert rep.ok, rep.errors
    assert len(rep.kept_float) == 1 and rep.kept_float[0].startswith(BROKEN)
    assert rep.counts["integer_ops"] >= len(quantized_layers(q)) - 1
    assert not check_ort_cpu_fusion(path).ok  # the same file, not told: one compute op stays float


def test_float_layers_survive_the_checkpoint(pico_2000_ckpt, fmnist_2000, tmp_path):
    q = _quantized(pico_2000_ckpt, fmnist_2000)
    set_float_layers(q, [BROKEN, "head"])
    save_quantized(tmp_path / "q.pt", q, fmnist_2000.classes)
    back = load_quantized(tmp_path / "q.pt")
    assert float_layers_of(back) == [BROKEN, "head"]
    x = q.preprocess(fmnist_2000.test.images[:32])
    with torch.no_grad():
        assert torch.allclose(q(x), back(x), atol=1e-6)


@pytest.fixture(scope="module")
def outlier_ckpt(pico_2000_ckpt, tmp_path_factory):
    """The trained pico with an activation outlier at BROKEN's input: channel 0 of the first block
    becomes a constant 500 (BatchNorm shift) that BROKEN ignores (its weights there are zeroed).
    FP32 barely changes; the per-tensor INT8 range of BROKEN's input grows ~100x, so every other
    channel loses precision there, and only running BROKEN in float removes that."""
    model = model_from_checkpoint(pico_2000_ckpt)
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules["features.0.1"].weight[0] = 0.0
        modules["features.0.1"].bias[0] = 500.0
        modules[BROKEN].weight[:, 0] = 0.0
    path = tmp_path_factory.mktemp("outlier") / "best.pt"
    save_checkpoint(path, model, load_checkpoint(pico_2000_ckpt)["classes"], "student")
    return path


def test_run_qad_with_a_budget_keeps_sensitive_layers_and_trains_again(outlier_ckpt, tmp_path):
    """INT8 loses points on the outlier layer; budget 0.5 triggers the search, the mixed model is
    trained by QAD again (``mixed/``), and its float layers, sensitivity file and plot are on record."""
    small = load_data(DataConfig(train_subset=800, test_subset=200), 0)
    cfg = QuantizeConfig(calib_images=64, calibrator="max", max_accuracy_drop=0.5, sensitivity_images=100,  # max: this test is about the budget
                         train=TrainConfig(epochs=1, batch_size=64, lr=1e-5, weight_decay=0.0, warmup_epochs=0.0))
    res = run_qad(QadJob(for_target(cfg, "tensorrt", host_arch()), Path(outlier_ckpt), lambda model: (cross_entropy_loss(), None), confirm_on_export), small, tmp_path, StageContext(data_cfg=DataConfig(augment="none")))
    m = res["metrics"]
    budget = m["accuracy_budget"]
    assert budget["full_int8_val_drop_points"] > 0.5, "the test needs INT8 to lose more than the budget on validation"
    assert budget["sensitivity"][0]["layer"] == BROKEN
    assert budget["search_steps"][0]["float_layers"] == [] and len(budget["search_steps"]) >= 2
    assert (tmp_path / "sensitivity.json").is_file() and (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "sensitivity.json").read_text())
    assert len(record["sensitivity"]["layers"]) == len(quantized_layers(load_quantized(res["checkpoint"])))
    assert any(r["exported_gain"] is not None for r in record["sensitivity"]["layers"])
    assert BROKEN in m["float_layers"] and budget["met"]
    assert BROKEN in budget["float_layers_before_retraining"] and all("removed" in s for s in budget["after_retraining"])
    assert "mixed" in res["checkpoint"] and float_layers_of(load_quantized(res["checkpoint"])) == m["float_layers"]
    assert m["val"]["top1"] > budget["full_int8_val_top1"]


def test_cli_exclude_names_an_unknown_layer_in_one_line(pico_2000_ckpt, tmp_path):
    proc = run_inprocess("export", str(pico_2000_ckpt), "--layout", "tensorrt", "--exclude", "conv_that_is_not_there", "--set", "data.train_subset=300",
                         "--set", "data.test_subset=64", "--out", str(tmp_path / "x"))
    assert_one_line_error(proc, "no quantized layer named 'conv_that_is_not_there'")


def test_cli_export_with_exclude_records_the_float_layer_and_its_cost(pico_2000_ckpt, tmp_path):
    proc = run_inprocess("export", str(pico_2000_ckpt), "--layout", "ort-cpu", "--exclude", f"{BROKEN},head", "--set", "data.train_subset=300",
                         "--set", "data.test_subset=64", "--out", str(tmp_path / "x"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "x" / "export.json").read_text())
    assert record["mixed_precision"]["float_layers"] == [BROKEN, "head"]
    steps = record["mixed_precision"]["steps"]
    assert [s["float_layers"] for s in steps] == [0, 1, 2] and all(s["batch1_ms"] > 0 and s["batch64_ms"] > 0 for s in steps)
    assert record["checks"]["gate"]["ok"] and sorted(record["checks"]["ort_cpu_fusion"]["kept_float"])[0].startswith(BROKEN)
    from edgekd.export import read_metadata

    assert read_metadata(tmp_path / "x" / "model.onnx")["float_layers"] == [BROKEN, "head"]


def test_another_budget_reuses_the_sensitivity_file_and_bad_files_are_refused(pico_2000_ckpt, fmnist_2000, tmp_path):
    from edgekd.quantize.sensitivity import load_sensitivity

    q = _quantized(pico_2000_ckpt, fmnist_2000)
    _break(q)
    sens = measure_sensitivity(q, _score(fmnist_2000), len(fmnist_2000.val), alone=False)
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"sensitivity": sens.to_dict()}))
    assert load_sensitivity(path, q).ranking() == sens.ranking()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EdgekdError, match="cannot read the sensitivity file"):
        load_sensitivity(tmp_path / "bad.json", q)
    other = json.loads(path.read_text())
    other["sensitivity"]["layers"][0]["layer"] = "blocks.9.conv"
    path.write_text(json.dumps(other))
    with pytest.raises(EdgekdError, match="names layer 'blocks.9.conv'"):
        load_sensitivity(path, q)
