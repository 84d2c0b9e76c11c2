"""An accuracy budget (``quantize.max_accuracy_drop``): when full INT8 loses more than the budget
to FP32 on validation after QAD, the fewest, most sensitive layers stay in higher precision and QAD
runs again with them excluded; then each goes back to INT8 in turn where the budget still holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch.nn as nn

from edgekd import ui
from edgekd.atomic import write_json_atomic
from edgekd.config import QuantizeConfig
from edgekd.data import DataSet
from edgekd.quantize.fakequant import save_quantized
from edgekd.quantize.ptq import top1_on
from edgekd.quantize.qad import ExportConfirm, QadPass, QadRun, checkpoint_extra, qad_pass
from edgekd.quantize.sensitivity import (drop_unneeded, fit_accuracy_budget, float_layers_of, load_sensitivity, measure_sensitivity, refresh_weight_ranges,
                                         sensitivity_plot, set_float_layers)
from edgekd.train.env import on_main


def search_float_layers(model: nn.Module, cfg: QuantizeConfig, data: DataSet, out_dir: Path, fp32_val: float, confirm: ExportConfirm | None = None) -> dict[str, Any]:
    """Per-layer sensitivity on ``cfg.sensitivity_images`` validation images (the top 3 confirmed
    on the exported file by ``confirm``, e.g. :func:`edgekd.export.confirm_on_export`), then the fewest layers in float that bring validation top-1 within
    ``cfg.max_accuracy_drop`` points of ``fp32_val``. Leaves ``model`` with that set; writes
    ``sensitivity.json`` and ``sensitivity.png`` into ``out_dir``; returns the record."""
    if cfg.sensitivity_file:
        sens = load_sensitivity(cfg.sensitivity_file, model)
        ui.log(f"per-layer sensitivity from {cfg.sensitivity_file} ({len(sens.layers)} layers, not measured again)")
    else:
        probe = data.val.subset(cfg.sensitivity_images)
        sens = measure_sensitivity(model, lambda m: top1_on(m, probe, data.classes), len(probe), cfg.exclude)
        for layer, gain in (confirm(model, sens.ranking()[:3], probe, out_dir) if confirm else {}).items():
            next(r for r in sens.layers if r.layer == layer).exported_gain = gain
    helpful = [r.layer for r in sens.layers if r.float_gain > 0]  # layers whose float copy lost nothing alone are not worth a try
    search = fit_accuracy_budget(model, helpful, lambda m: top1_on(m, data.val, data.classes), fp32_val, cfg.max_accuracy_drop, cfg.exclude)
    on_main(lambda: (write_json_atomic(out_dir / "sensitivity.json", {"sensitivity": sens.to_dict(), "search": search.to_dict()}),
                     sensitivity_plot(sens, out_dir / "sensitivity.png")))
    drop = round(100 * (fp32_val - search.top1), 3)
    return {"budget_points": cfg.max_accuracy_drop, "met": search.met, "val_drop_points": drop, "float_layers": search.float_layers,
            "sensitivity": [r.__dict__ for r in sens.layers[:20]], "search_steps": search.steps, "sensitivity_file": str(out_dir / "sensitivity.json")}


def retry_in_int8(job: QadRun, mixed: QadPass) -> tuple[QadPass, list[dict[str, Any]]]:
    """QAD with the chosen layers in float retrains every other layer around them, so a layer the
    first pass needed may not be needed any more. Each goes back to INT8 in turn (its weight range
    from its retrained weights, its input's range from the calibration), the last added first, and
    stays in INT8 when validation still fits the budget: each float layer left costs a DQ/Q round
    trip (MobileNetV3-Large at budget 0.3: 6 float layers before, 2 after; benchmarks/mixed_precision_results.md).
    The checkpoint is rewritten when a layer went back; returns the pass and the steps tried."""
    model, before, steps = mixed.model, float_layers_of(mixed.model), []
    pinned = set(job.cfg.exclude)
    if not set(before) - pinned:
        return mixed, steps
    refresh_weight_ranges(model, before)
    data, fp32_top1 = job.data, mixed.fp32_val
    kept, top1 = drop_unneeded(model, before, mixed.val, pinned, lambda m: top1_on(m, data.val, data.classes), fp32_top1,
                               job.cfg.max_accuracy_drop, steps)
    set_float_layers(model, kept)
    if kept == before:
        return mixed, steps
    ui.log(f"after retraining, {len(before) - len(kept)} of the {len(before)} float layer(s) went back to INT8 within the budget "
           f"(val top-1 {mixed.val:.4f} -> {top1:.4f}); {len(kept)} stay in higher precision")
    on_main(lambda: save_quantized(mixed.result.best_path, model, data.classes, {**checkpoint_extra(job), "metrics": {"val": {"top1": top1}, "epoch": -1}}))
    return dataclasses.replace(mixed, val=top1), steps


def meet_budget(job: QadRun, first: QadPass, out_dir: Path) -> tuple[QadPass, dict[str, Any]]:
    """Keep the fewest, most sensitive layers in higher precision until INT8 is within the budget
    of FP32 on validation, then QAD again with them excluded (into ``out_dir/mixed``)."""
    budget, drop = job.cfg.max_accuracy_drop, 100 * (first.fp32_val - first.val)
    record: dict[str, Any] = {"budget_points": budget, "full_int8_val_drop_points": round(drop, 3)}
    if drop <= budget:
        ui.log(f"INT8 is within the accuracy budget: {drop:.2f} <= {budget:g} points below FP32 on validation; no layer needs higher precision")
        return first, {**record, "met": True, "val_drop_points": round(drop, 3), "float_layers": float_layers_of(first.model)}
    ui.log(f"INT8 loses {drop:.2f} points on validation, over the budget of {budget:g}: measuring per-layer sensitivity")
    pinned = float_layers_of(first.model)
    record.update(search_float_layers(first.model, job.cfg, job.data, out_dir, first.fp32_val, job.confirm))
    set_float_layers(first.model, pinned)  # first.model stays what its checkpoint holds
    floats = record["float_layers_before_retraining"] = record["float_layers"]
    ui.log(f"keeping {len(floats)} layer(s) in higher precision ({', '.join(floats[:5])}{' ...' if len(floats) > 5 else ''}); "
           "quantization-aware distillation again with them excluded")
    second = qad_pass(job, out_dir / "mixed", floats)
    second, record["after_retraining"] = retry_in_int8(job, second)
    chosen = second if second.val >= first.val else first
    final_drop = 100 * (chosen.fp32_val - chosen.val)
    met = final_drop <= budget
    if not met:
        ui.warn(f"accuracy budget not met: the best found loses {final_drop:.2f} points (budget {budget:g}) on validation with "
                f"{len(float_layers_of(chosen.model))} layer(s) in higher precision; raise --max-accuracy-drop, train longer, or pin layers with --exclude")
    return chosen, {**record, "met": met, "val_drop_points": round(final_drop, 3), "float_layers": float_layers_of(chosen.model),
                    "mixed_val_top1": second.val, "full_int8_val_top1": first.val}
