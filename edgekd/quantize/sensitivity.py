"""Accuracy-aware INT8: which layers INT8 hurts, and the fewest to keep in higher precision.

What users of every INT8 tool end up doing by hand when "INT8 lost accuracy" (NVIDIA/TensorRT#1834):
find the sensitive layers and run them in FP16. NVIDIA Model Optimizer searches per-layer formats
under an effective-bits limit (AutoQuantize), OpenVINO NNCF reverts layers until a ``max_drop`` holds
(``quantize_with_accuracy_control``), Polygraphy bisects (``debug precision``). edgekd does the
NNCF-style search on its own fake-quant graph, so the result is trained (QAD runs again with those
layers in float) and exported per runtime.

A *layer* is a weighted module (Conv, Linear) with its weight quantizer, named by its module path
(``blocks.5.0.conv_pw``). Running a layer "in float" means: its weight quantizer is off and its
input is read *before* the activation quantizer that feeds it (other consumers of that tensor keep
theirs). In the exported graph that layer then has no Q/DQ of its own: TensorRT runs it in FP16
(the engine is built with ``--int8 --fp16``), onnxruntime CPU in float (``nodes_to_exclude``).

- :func:`measure_sensitivity`: per layer, the top-1 gained when only it runs in float
  (leave-one-out, on the fully quantized model) and lost when only it is quantized.
- :func:`fit_accuracy_budget`: keeps layers in float in sensitivity order until the drop against
  FP32 fits the budget, and stops at the first fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch.fx
import torch.nn as nn

from edgekd import ui
from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError
from edgekd.quantize.placement import ACT_PREFIX, INPUT_KINDS, _is_passthrough, input_quantizers, op_kind

ORIGINAL_INPUT = "edgekd_quantized_input"  # node.meta key: the (quantized) input a layer had before any bypass
BYPASS_CLONE = "edgekd_bypass_clone"
MAX_FLOAT_FRACTION = 0.5  # beyond half the layers in float, INT8 has stopped being the point: say so instead

Score = Callable[[nn.Module], float]


def quantized_layers(gm: nn.Module) -> list[str]:
    """Module paths of the layers that carry a weight quantizer, in graph (execution) order."""
    if not isinstance(gm, torch.fx.GraphModule):
        return []
    modules = dict(gm.named_modules())
    return list(dict.fromkeys(n.target for n in gm.graph.nodes
                              if n.op == "call_module" and hasattr(modules.get(n.target), "weight_quantizer")))


def float_layers_of(model: nn.Module) -> list[str]:
    return list(getattr(model, "edgekd_float_layers", []))


def _is_act_quantizer(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and str(node.target).startswith(ACT_PREFIX + ".")


def _unquantized(gm: torch.fx.GraphModule, node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    """``node``'s value read before its activation quantizer: the quantizer's input, or for a
    Flatten/reshape after a quantizer a copy of it that reads the unquantized tensor."""
    if _is_act_quantizer(node):
        return node.args[0]
    if _is_passthrough(node, modules) and isinstance(node.args[0], torch.fx.Node):
        inner = _unquantized(gm, node.args[0], modules)
        if inner is node.args[0]:
            return node
        with gm.graph.inserting_after(node):
            clone = gm.graph.node_copy(node, lambda a: inner if a is node.args[0] else a)
        clone.meta[BYPASS_CLONE] = True
        return clone
    return node


def _erase_unused_clones(gm: torch.fx.GraphModule) -> None:
    for node in reversed(list(gm.graph.nodes)):
        if node.meta.get(BYPASS_CLONE) and not node.users:
            gm.graph.erase_node(node)


def _users_through_passthrough(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[torch.fx.Node]:
    out = []
    for user in node.users:
        out += _users_through_passthrough(user, modules) if _is_passthrough(user, modules) else [user]
    return out


def _sync_ort_quantizers(gm: torch.fx.GraphModule, floats: set[str], modules: dict[str, nn.Module]) -> None:
    """On ``ort-cpu`` a tensor has Q/DQ when an op onnxruntime quantizes (not excluded) makes it or
    reads it, and onnxruntime feeds every reader, float layers too, from the DQ. So each activation
    quantizer is on exactly when such an op (a folded ReLU looked through) produces or consumes
    its tensor: a float layer's output quantizer goes off when only float or unquantized ops
    (hard-swish, say) read it."""
    def quantized(n: torch.fx.Node) -> bool:
        return op_kind(n, modules) in INPUT_KINDS["ort-cpu"] and not (n.op == "call_module" and n.target in floats)

    for node in gm.graph.nodes:
        if not _is_act_quantizer(node):
            continue
        src = node.args[0]
        producer = src.args[0] if op_kind(src, modules) == "relu" and isinstance(src.args[0], torch.fx.Node) else src
        active = quantized(producer) or any(quantized(u) for u in _users_through_passthrough(node, modules))
        modules[node.target].enable() if active else modules[node.target].disable()


def set_float_layers(gm: nn.Module, layers: Iterable[str]) -> list[str]:
    """Run exactly ``layers`` in float and every other layer in INT8 (reversible: call again with
    another set). Returns the float layers in graph order; an unknown name is a one-line error.

    The fake-quant model mirrors the runtime: on ``tensorrt`` a float layer reads its input before
    the activation quantizer (no Q/DQ of its own; other readers keep theirs); on ``ort-cpu`` the
    activation quantizers are switched to exactly those onnxruntime will place
    (:func:`_sync_ort_quantizers`)."""
    names = quantized_layers(gm)
    wanted = set(layers)
    unknown = sorted(wanted - set(names))
    if unknown:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all; sensitivity.json of a budgeted run ranks them all)" if len(names) > 12 else "")
        raise EdgekdError(f"no quantized layer named '{unknown[0]}' in this model", f"layers are module paths: {shown}")
    modules = dict(gm.named_modules())
    by_name = {n.name: n for n in gm.graph.nodes}
    ort = getattr(gm, "edgekd_placement", {}).get("layout") == "ort-cpu"
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in names or not isinstance(node.args[0], torch.fx.Node):
            continue
        original = by_name[node.meta.setdefault(ORIGINAL_INPUT, node.args[0].name)]
        node.args = (_unquantized(gm, original, modules) if node.target in wanted and not ort else original, *node.args[1:])
        quantizer = modules[node.target].weight_quantizer
        quantizer.disable() if node.target in wanted else quantizer.enable()
    _erase_unused_clones(gm)
    if ort:
        _sync_ort_quantizers(gm, wanted, modules)
    gm.recompile()
    kept = [n for n in names if n in wanted]
    gm.edgekd_float_layers = kept
    if isinstance(getattr(gm, "edgekd_quant", None), dict):
        gm.edgekd_quant["float_layers"] = kept
    return kept


class _OnlyQuantized:
    """Context: only ``layer`` runs in INT8 (its weight and its input quantizer); every other
    layer and activation quantizer is off (``layer=None``: everything off, the FP32 network).
    Restores the model's float layers and quantizers after."""

    def __init__(self, gm: nn.Module, layer: str | None):
        self.gm, self.layer = gm, layer

    def __enter__(self) -> nn.Module:
        self.before = float_layers_of(self.gm)
        set_float_layers(self.gm, [n for n in quantized_layers(self.gm) if n != self.layer])
        self.switched = _act_quantizers_off(self.gm, keep=(input_quantizers(self.gm).get(self.layer),) if self.layer else ())
        return self.gm

    def __exit__(self, *exc) -> None:
        for m in self.switched:
            m.enable()
        set_float_layers(self.gm, self.before)


@dataclass
class LayerSensitivity:
    layer: str
    float_gain: float  # top-1 points gained when only this layer runs in float (the rest INT8)
    alone_drop: float | None  # top-1 points lost when only this layer is INT8 (the rest float)
    exported_gain: float | None = None  # float_gain confirmed on the exported file, where measured


@dataclass
class Sensitivity:
    images: int
    int8_top1: float  # every layer INT8 (except pinned ones)
    float_top1: float | None  # every quantizer off
    pinned: list[str]
    layers: list[LayerSensitivity] = field(default_factory=list)  # most sensitive first

    def ranking(self) -> list[str]:
        return [r.layer for r in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _act_quantizers_off(gm: nn.Module, keep: tuple = ()) -> list[nn.Module]:
    """Switch off every enabled activation quantizer but ``keep``; returns those switched."""
    switched = [m for name, m in gm.named_modules() if name.startswith(ACT_PREFIX + ".") and m.is_enabled and all(m is not k for k in keep)]
    for m in switched:
        m.disable()
    return switched


def score_without_quantizers(gm: nn.Module, score: Score) -> float:
    """``score`` of the model with every quantizer off: the FP32 network it was made from."""
    with _OnlyQuantized(gm, None):
        return score(gm)


def measure_sensitivity(gm: nn.Module, score: Score, images: int, pinned: Iterable[str] = (), alone: bool = True) -> Sensitivity:
    """Leave-one-out sensitivity of every quantized layer (and, with ``alone``, its error when it is
    the only INT8 layer), scored by ``score(model) -> top-1`` on a fixed image set."""
    pinned = set_float_layers(gm, pinned)
    candidates = [n for n in quantized_layers(gm) if n not in pinned]
    full = score(gm)
    everything_float = score_without_quantizers(gm, score) if alone else None
    rows: list[LayerSensitivity] = []
    with ui.progress() as prog:
        task = prog.add_task("per-layer INT8 sensitivity", total=len(candidates), rate="", info="")
        for layer in candidates:
            set_float_layers(gm, [*pinned, layer])
            gain = score(gm) - full
            drop = None
            if alone:
                with _OnlyQuantized(gm, layer):
                    drop = everything_float - score(gm)
            rows.append(LayerSensitivity(layer, round(100 * gain, 3), None if drop is None else round(100 * drop, 3)))
            prog.update(task, advance=1, info=layer)
    set_float_layers(gm, pinned)
    rows.sort(key=lambda r: (-r.float_gain, -(r.alone_drop or 0.0)))
    return Sensitivity(images, full, everything_float, pinned, rows)


def load_sensitivity(path: str | Path, model: nn.Module) -> Sensitivity:
    """A ``sensitivity.json`` from an earlier run, checked against ``model``'s layers: trying another
    budget on the same student needs the ranking, not another hour of measuring."""
    import json

    try:
        raw = json.loads(Path(path).read_text())["sensitivity"]
        sens = Sensitivity(raw["images"], raw["int8_top1"], raw["float_top1"], raw["pinned"], [LayerSensitivity(**r) for r in raw["layers"]])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgekdError(f"cannot read the sensitivity file {path}: {exc}", "pass the sensitivity.json an accuracy-budgeted run wrote") from exc
    unknown = sorted({r.layer for r in sens.layers} - set(quantized_layers(model)))
    if unknown:
        raise EdgekdError(f"the sensitivity file {path} names layer '{unknown[0]}', which this model does not have", "it was measured on another network")
    return sens


@dataclass
class BudgetSearch:
    budget_points: float
    fp32_top1: float
    steps: list[dict[str, Any]]  # one per layer tried ("tried") or taken out ("removed"): adopted or not, the float set after it, top-1, drop
    float_layers: list[str]
    met: bool
    top1: float  # with ``float_layers``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_accuracy_budget(gm: nn.Module, ranking: list[str], score: Score, fp32_top1: float, budget_points: float,
                        pinned: Iterable[str] = ()) -> BudgetSearch:
    """Try layers in float, most sensitive first, until top-1 is within ``budget_points`` of FP32;
    stops at the first set that fits. A layer stays float only if it raised top-1 (measured here,
    with the layers kept so far): single-layer gains do not add up, and on a validation set of a
    few hundred images a layer that does not help is noise, not a reason to give up INT8 speed.
    Then :func:`drop_unneeded` takes out the layers the fitting set does not need.
    If nothing fits before :data:`MAX_FLOAT_FRACTION` of the layers are float or the ranking runs
    out, the most accurate set found is kept and ``met`` is False. Leaves ``gm`` with the set."""
    kept = set_float_layers(gm, pinned)
    limit = max(1, int(MAX_FLOAT_FRACTION * len(quantized_layers(gm))))
    best = score(gm)
    steps = [_step("tried", None, True, kept, best, fp32_top1)]
    for layer in (r for r in ranking if r not in kept):
        if 100 * (fp32_top1 - best) <= budget_points or len(kept) >= limit:
            break
        set_float_layers(gm, [*kept, layer])
        top1 = score(gm)
        helped = top1 > best
        if helped:
            kept, best = float_layers_of(gm), top1
        steps.append(_step("tried", layer, helped, kept, top1, fp32_top1))
    met = 100 * (fp32_top1 - best) <= budget_points
    if met and len(set(kept) - set(pinned)) >= 2:  # the pinned set alone did not fit, so a single chosen layer is needed
        kept, best = drop_unneeded(gm, kept, best, set(pinned), score, fp32_top1, budget_points, steps)
    set_float_layers(gm, kept)
    return BudgetSearch(budget_points, fp32_top1, steps, list(kept), met, best)


def drop_unneeded(gm: nn.Module, kept: list[str], best: float, pinned: set[str], score: Score, fp32_top1: float, budget_points: float,
                  steps: list[dict[str, Any]]) -> tuple[list[str], float]:
    """The forward search adds layers one at a time, so a layer taken early can be unneeded once
    later ones run in float (and QAD with the set in float retrains the rest around it). Take each
    out, the last added first, and leave it out if the rest still fits: every float layer costs
    latency, so the set shipped is one where none can go. Appends one "removed" step per try."""
    for layer in reversed([k for k in kept if k not in pinned]):
        trial = [k for k in kept if k != layer]
        set_float_layers(gm, trial)
        top1 = score(gm)
        fits = 100 * (fp32_top1 - top1) <= budget_points
        if fits:
            kept, best = trial, top1
        steps.append(_step("removed", layer, fits, kept, top1, fp32_top1))
    return kept, best


def refresh_weight_ranges(gm: nn.Module, layers: Iterable[str]) -> None:
    """Set each layer's weight-quantizer range to its weights' per-channel max (what max calibration
    computes): a layer trained in float has drifted from the range calibrated before, and goes
    back to INT8 with its own."""
    modules = dict(gm.named_modules())
    for layer in layers:
        weight, quantizer = modules[layer].weight.detach(), modules[layer].weight_quantizer
        amax = weight.abs().amax(dim=tuple(range(1, weight.dim())))
        quantizer.amax = amax.reshape(quantizer.amax.shape) if getattr(quantizer, "amax", None) is not None else amax


def _step(kind: str, layer: str | None, adopted: bool, float_layers: Iterable[str], top1: float, fp32_top1: float) -> dict[str, Any]:
    """One line of the search's record: the layer tried in float (or taken out), whether the set
    with it was adopted, the float set after the step, and top-1 with the step's set."""
    return {kind: layer, "kept": adopted, "float_layers": list(float_layers), "top1": top1, "drop_points": round(100 * (fp32_top1 - top1), 3)}


def sensitivity_plot(sens: Sensitivity, path: str | Path, top: int = 20) -> Path | None:
    """Bar chart of the most sensitive layers (top-1 points gained when each alone runs in float)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    rows = sens.layers[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    ax.barh([r.layer for r in rows], [r.float_gain for r in rows], color="tab:blue", label="float alone (rest INT8)")
    if any(r.alone_drop is not None for r in rows):
        ax.barh([r.layer for r in rows], [-(r.alone_drop or 0.0) for r in rows], color="tab:red", alpha=0.6, label="INT8 alone (rest float), lost")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"top-1 points on {sens.images} validation images (INT8 model: {100 * sens.int8_top1:.2f}%)")
    ax.set_title("Which layers INT8 hurts")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
