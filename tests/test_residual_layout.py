"""Residual Adds in the TensorRT layout: Q/DQ on the identity input only, as NVIDIA places them.

On resnet18 (basic blocks, downsample shortcuts) and mobilenetv2_100 (inverted residuals), every
residual Add of edgekd's exported file has exactly one quantized input, the identity: the other
comes straight from the Conv TensorRT fuses the Add into. The readiness check accepts that layout
and the both-inputs one (with a warning that says which fuses better), and passes a graph
quantized by Model Optimizer's own ONNX PTQ where that is installed (its own venv, .ci/setup).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper

from edgekd.config import QuantizeConfig
from edgekd.data import load_dataset
from edgekd.export.graph import Graph
from edgekd.export.modelopt_reference import modelopt_python, placement, placement_differences, quantize_with_modelopt
from edgekd.export.to_onnx import torch_to_onnx, without_quantizers
from edgekd.export.tensorrt_layout import check_tensorrt_readiness, export_int8_tensorrt
from edgekd.models import create_model
from edgekd.quantize import quantize_model
from needs import skip_without_fmnist

NETS = ["resnet18", "mobilenetv2_100"]


@pytest.fixture(scope="module")
def images():
    skip_without_fmnist()
    return load_dataset("fashion-mnist", train_subset=128, test_subset=16, seed=0).train.images


@pytest.fixture(scope="module")
def exported(images, tmp_path_factory):
    """{name: (edgekd's tensorrt-layout proto, the same prepared network's FP32 ONNX path, calibration batch)}."""
    out = {}
    for name in NETS:
        d = tmp_path_factory.mktemp(name)
        m = create_model(name, 10, pretrained="none", input_size=32)
        q = quantize_model(m, QuantizeConfig(calibrator="max", layout="tensorrt"), images[:64], m.preprocess)
        proto = onnx.load(str(export_int8_tensorrt(q, d / "edgekd.onnx", q.preprocess)))
        torch_to_onnx(without_quantizers(q), d / "fp32.onnx", q.preprocess)
        out[name] = (proto, d / "fp32.onnx", q.preprocess(images[:64]).numpy())
    return out


def _producer(g: Graph, tensor: str):
    """The op behind ``tensor`` once Q/DQ are skipped."""
    node = g.skip_casts(tensor)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        node = g.skip_casts(node.input[0])
    return node


def _depth_to(g: Graph, start, target) -> int | None:
    """Shortest number of ops from ``start`` back to ``target`` (None: not an ancestor)."""
    frontier, seen, depth = [start], set(), 0
    while frontier:
        if any(n is target for n in frontier):
            return depth
        nxt = []
        for n in frontier:
            for t in n.input:
                p = g.producer(t)
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    nxt.append(p)
        frontier, depth = nxt, depth + 1
    return None


@pytest.mark.parametrize("name", NETS)
def test_residual_add_quantizes_the_identity_only(exported, name):
    proto = exported[name][0]
    rep = check_tensorrt_readiness(proto)
    assert rep.ok, rep.errors[:3]
    assert rep.residual_adds and all(a["layout"] == "identity-only" for a in rep.residual_adds), rep.residual_adds
    assert not any("both inputs" in w for w in rep.warnings)
    g = Graph(proto)
    for add in (n for n in g.nodes if n.op_type == "Add" and g.const(n.input[0]) is None and g.const(n.input[1]) is None):
        dq = [g.skip_casts(t) is not None and g.skip_casts(t).op_type == "DequantizeLinear" for t in add.input]
        assert dq.count(True) == 1, (add.name, dq)
        branch, identity = _producer(g, add.input[dq.index(False)]), _producer(g, add.input[dq.index(True)])
        assert branch.op_type == "Conv"  # the conv-branch input comes straight from its Conv: TensorRT fuses Conv + Add
        # the identity is the shortcut: the quantized input is (or is one conv from) where the conv branch starts
        start = identity if identity.op_type != "Conv" else _producer(g, identity.input[0])
        assert _depth_to(g, branch, start) is not None and (identity.op_type != "Conv" or _depth_to(g, branch, start) > 1), (add.name, identity.name)


def test_readiness_accepts_both_inputs_quantized_and_says_identity_only_fuses_better(exported):
    p = copy.deepcopy(exported["resnet18"][0])
    g = Graph(p)
    for i, add in enumerate(n for n in g.nodes if n.op_type == "Add" and g.const(n.input[1]) is None):
        slot = [g.skip_casts(t) is not None and g.skip_casts(t).op_type == "DequantizeLinear" for t in add.input].index(False)
        scale, zero = f"both_s{i}", f"both_z{i}"
        p.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.05, np.float32), scale), onnx.numpy_helper.from_array(np.array(0, np.int8), zero)])
        p.graph.node.extend([helper.make_node("QuantizeLinear", [add.input[slot], scale, zero], [f"both_q{i}"], name=f"both_Q{i}"),
                             helper.make_node("DequantizeLinear", [f"both_q{i}", scale, zero], [f"both_dq{i}"], name=f"both_DQ{i}")])
        add.input[slot] = f"both_dq{i}"
    rep = check_tensorrt_readiness(p)
    assert rep.ok, rep.errors[:3]
    assert all(a["layout"] == "both" for a in rep.residual_adds)
    assert any("quantize both inputs" in w and "identity input only" in w for w in rep.warnings)


@pytest.mark.slow
def test_readiness_passes_model_optimizers_own_onnx_ptq(exported, tmp_path):
    py, why = modelopt_python()
    if py is None:
        pytest.skip(f"Model Optimizer's ONNX PTQ is not installed: {why}")
    proto, fp32, calib = exported["resnet18"]
    theirs = onnx.load(str(quantize_with_modelopt(fp32, tmp_path / "modelopt.onnx", calib)))
    rep = check_tensorrt_readiness(theirs)
    assert rep.ok, rep.errors[:3]
    assert rep.residual_adds and all(a["layout"] == "identity-only" for a in rep.residual_adds)  # NVIDIA's layout, accepted
    diff = placement_differences(placement(proto), placement(theirs))
    # the same residual placement; what remains is edgekd's INT8 head and ModelOpt's Q/DQ before pooling (see architectures_results.md)
    assert not [d for d in diff["only_ours"] + diff["only_theirs"] if "Add" in d.split(" <- ")[0]], diff
    assert all("Gemm" in d for d in diff["only_ours"]) and all("Pool" in d for d in diff["only_theirs"]) and not diff["unmatched"], diff


def test_a_venv_without_model_optimizer_is_named_as_such(tmp_path, monkeypatch):
    """The probe finds the packages without importing them (an import of modelopt.onnx takes ~12 s)
    and says which are missing, so the reference test above skips with the reason."""
    import shutil
    import sys

    from edgekd.export.modelopt_reference import VENV_ENV

    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or bare == sys.executable:
        pytest.skip("no system python3 beside the test's own")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(bare)
    monkeypatch.setenv(VENV_ENV, str(tmp_path))
    py, why = modelopt_python()
    if py is not None:
        pytest.skip(f"{bare} has Model Optimizer, onnx and onnxruntime")
    assert "lacks modelopt" in why, why
    monkeypatch.setenv(VENV_ENV, str(tmp_path / "nowhere"))
    assert modelopt_python()[0] is None and "no Model Optimizer ONNX venv" in modelopt_python()[1]
