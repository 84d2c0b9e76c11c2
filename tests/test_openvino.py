"""OpenVINO: the openvino layout's integer kernels on a real compile, the runner, the bundle on OpenVINO
without torch, the x86 report's runtime table, and the OpenVINO / Intel targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.bench import BenchRequest, TimingPlan, run_bench
from edgekd.bench.cpu_runtimes import compare_cpu_runtimes, runtime_lines, runtime_verdict
from edgekd.config import QuantizeConfig
from edgekd.errors import EdgekdError
from edgekd.export.to_onnx import export_fp32
from edgekd.export.openvino_layout import check_openvino_int8, compiled_layers, export_int8_openvino, openvino_logits
from edgekd.targets import accelerator_present, get_target

pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install 'edgekd[openvino]')")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ov_files(pico_model, tmp_path_factory):
    """The pico student quantized for the openvino layout (calibrated on real images), exported; and its FP32 file."""
    from edgekd.quantize.fakequant import quantize_model

    out = tmp_path_factory.mktemp("ov")
    model = pico_model.model
    fp32 = out / "fp32.onnx"
    export_fp32(model, fp32, pico_model.preprocess)
    import copy

    q = quantize_model(copy.deepcopy(model), QuantizeConfig(calibrator="max", weight_bits=8, layout="openvino"), torch.from_numpy(pico_model.images[:64]),
                       pico_model.preprocess)
    path = export_int8_openvino(q, out / "int8.onnx", pico_model.preprocess)
    return {"int8": path, "fp32": fp32, "qmodel": q, "dir": out}


def _compute_layers(path: Path) -> list[dict[str, str]]:
    return [r for r in compiled_layers(path) if r["layerType"] in ("Convolution", "FullyConnected")]


def test_openvino_layout_runs_every_conv_in_integer_kernels(ov_files, pico_model):
    """The compiled model's own runtime info: each Convolution / FullyConnected of the openvino-layout file runs in u8/i8,
    every one of the FP32 file in f32; the check agrees with both, and the file computes what the fake-quant model does."""
    layers = _compute_layers(ov_files["int8"])
    assert len(layers) == 4 and all(r["runtimePrecision"].upper() in ("U8", "I8") for r in layers), layers
    rep = check_openvino_int8(ov_files["int8"])
    assert rep.ok and rep.counts["integer_ops"] == 4 and rep.counts["float_compute_ops"] == 0
    assert all(r["runtimePrecision"].lower() in ("f32", "fp32") for r in _compute_layers(ov_files["fp32"]))
    fp32_rep = check_openvino_int8(ov_files["fp32"])
    assert not fp32_rep.ok and fp32_rep.counts["float_compute_ops"] == 4
    x = pico_model.preprocess(torch.from_numpy(pico_model.images[:128]))
    with torch.no_grad():
        ref = ov_files["qmodel"](x).numpy()
    got = openvino_logits(ov_files["int8"], x.numpy())
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99


def test_a_layer_left_in_float_stops_the_check_unless_it_is_kept_on_purpose(ov_files, pico_model, tmp_path):
    """One conv without its quantizers: OpenVINO runs it in f32; the check names it, except when it is a float layer by choice."""
    import copy

    from edgekd.quantize.sensitivity import set_float_layers

    q = copy.deepcopy(ov_files["qmodel"])
    set_float_layers(q, ["features.2.0"])
    path = export_int8_openvino(q, tmp_path / "mixed.onnx", pico_model.preprocess)
    rep = check_openvino_int8(path)
    assert not rep.ok and rep.counts["float_compute_ops"] == 1 and "float on OpenVINO" in rep.errors[0]
    kept = check_openvino_int8(path, ["features.2.0"])
    assert kept.ok and kept.kept_float == ["features.2.0"] and kept.counts["integer_ops"] == 3


def test_openvino_runner_bench_sweep_and_profile(ov_files):
    res = run_bench(BenchRequest(model=str(ov_files["int8"]), runtime="openvino", batches=[1, 8], plan=TimingPlan(warmup=2, runs=10), threads=1,
                                 profile_top=5, profile_runs=3))
    assert [s["batch"] for s in res["sweep"]] == [1, 8] and all(s["p50_ms"] > 0 for s in res["sweep"])
    assert res["runtime"] == "openvino" and res["threads"] == 1 and res["runtime_info"]["providers"][0].startswith("OpenVINO")
    assert res["profile"] and any("Convolution" in p["op"] for p in res["profile"])


def test_bench_cli_takes_runtime_openvino(ov_files):
    proc = subprocess.run([sys.executable, "-m", "edgekd", "bench", str(ov_files["int8"]), "--runtime", "openvino", "--runs", "10", "--warmup", "1",
                           "--threads", "1", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert json.loads(proc.stdout)["runtime"] == "openvino"


def test_x86_report_shows_every_cpu_runtime_side_by_side(ov_files):
    """The x86 build's runtime table: FP32 and INT8 measured on onnxruntime and OpenVINO, the verdict names the faster one."""
    from edgekd.report import markdown

    cpu = compare_cpu_runtimes({"int8": str(ov_files["int8"]), "fp32": str(ov_files["fp32"])}, [1, 4], TimingPlan(warmup=1, runs=5), 1, "x86-cpu")
    assert set(cpu["runtimes"]) == {"ort-cpu", "openvino"} and not cpu["skipped"]
    for rows in cpu["runtimes"].values():
        assert set(rows) == {"1", "4"} and all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in rows.values())
    best = min(cpu["runtimes"], key=lambda rt: cpu["runtimes"][rt]["4"]["int8_ms"])
    assert cpu["verdict"].startswith(f"INT8 is fastest on {best}")
    report = {"verdict": "v", "test_images": 0, "accuracy": [], "latency": [], "notes": [], "next": "n", "cpu_runtimes": cpu}
    md = markdown(report, "t")
    assert "| ort-cpu | 4 |" in md and "| openvino | 4 |" in md and cpu["verdict"] in md


def test_runtime_verdict_compares_int8_across_runtimes_and_with_fp32():
    table = {"ort-cpu": {"1": {"fp32_ms": 2.0, "int8_ms": 1.5}, "64": {"fp32_ms": 100.0, "int8_ms": 80.0}},
             "openvino": {"1": {"fp32_ms": 1.8, "int8_ms": 1.0}, "64": {"fp32_ms": 90.0, "int8_ms": 40.0}}}
    assert runtime_verdict(table) == "INT8 is fastest on openvino (40.00 ms at batch 64, 2.00x faster than ort-cpu's INT8, 2.25x the fastest FP32 (openvino))"
    assert runtime_verdict({}) == "no CPU runtime was measured"
    assert runtime_lines({"runtimes": {}, "skipped": {}, "verdict": "x"}) == []


def test_openvino_and_intel_targets():
    t = get_target("x86-openvino")
    assert (t.runtime, t.layout, t.openvino_device, t.precision) == ("openvino", "openvino", "CPU", "int8")
    assert accelerator_present(t).ok
    for name, device in (("intel-gpu", "GPU"), ("intel-npu", "NPU")):
        t = get_target(name)
        assert t.openvino_device == device and t.precision == "int8" and t.layout == "openvino"
        assert "NOT MEASURED" in (REPO / "targets" / f"{name}.toml").read_text()
        if device not in __import__("openvino").Core().available_devices:
            avail = accelerator_present(t)
            assert not avail.ok and f"no {device}" in avail.reason


def test_openvino_device_must_match_the_runtime(tmp_path):
    text = (REPO / "targets" / "x86-cpu.toml").read_text()
    (tmp_path / "bad.toml").write_text(text + '\nopenvino_device = "CPU"\n')
    with pytest.raises(EdgekdError, match="openvino_device"):
        get_target("bad", tmp_path)


def test_export_refuses_a_model_quantized_for_another_layout(pico_model, tmp_path):
    import copy

    from edgekd.quantize.fakequant import quantize_model

    q = quantize_model(copy.deepcopy(pico_model.model), QuantizeConfig(calibrator="max", layout="tensorrt"), torch.from_numpy(pico_model.images[:32]), pico_model.preprocess)
    with pytest.raises(EdgekdError, match="tensorrt layout, not openvino"):
        export_int8_openvino(q, tmp_path / "x.onnx", pico_model.preprocess)
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="session")
def openvino_only_env() -> Path:
    """A venv with only what an OpenVINO device needs: numpy, pillow, openvino. No onnxruntime, no torch.
    Cached in .edgekd-cache/ across runs."""
    venv = REPO / ".edgekd-cache" / "openvino-runtime"
    exe = venv / "bin" / "python"
    if not (venv / "ready").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        import openvino

        pip = subprocess.run([str(exe), "-m", "pip", "install", "-q", f"openvino=={openvino.__version__.split('-')[0]}", "numpy", "pillow"],
                             capture_output=True, text=True)
        if pip.returncode != 0:
            pytest.skip(f"cannot install openvino/numpy/pillow into a fresh venv here: {pip.stderr.strip().splitlines()[-1:]}")
        (venv / "ready").write_text("openvino numpy pillow\n")
    return exe


@pytest.mark.slow
def test_bundle_runs_on_openvino_without_torch_or_onnxruntime(ov_files, pico_model, tmp_path, openvino_only_env):
    """An x86-openvino bundle in a venv with only openvino, numpy and pillow: 'auto' picks OpenVINO, selfcheck agrees with the
    host's reference outputs (computed by OpenVINO there), an image file classifies as the fake-quant model says, bench runs."""
    from PIL import Image

    from edgekd.bundle import BundleModel, make_bundle

    bundle = make_bundle(tmp_path / "b", BundleModel({"pico": ov_files["int8"]}, "pico", pico_model.classes, pico_model.preprocess),
                         get_target("x86-openvino"), {"test_top1": 0.7}, {}, sample_images=pico_model.images[:16])
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["reference"]["computed_with"] == "OpenVINO CPU on the host"
    img = tmp_path / "x.png"
    Image.fromarray(pico_model.images[0, 0]).save(img)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([str(openvino_only_env), "-c", "import importlib.util as u; print(u.find_spec('onnxruntime'), u.find_spec('torch'))"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.split() == ["None", "None"], probe.stdout + probe.stderr
    check = subprocess.run([str(openvino_only_env), "-m", "edgekd.runtime", "selfcheck", ".", "--json"], capture_output=True, text=True, cwd=bundle, env=env)
    assert check.returncode == 0, check.stderr[-2000:]
    res = json.loads(check.stdout)
    assert res["ok"] and res["backend"] == "openvino" and res["device"]["torch_loaded"] is False and res["reference"]["top1_agreement"] == 1.0
    proc = subprocess.run([str(openvino_only_env), "-m", "edgekd.runtime", ".", str(img), "--json", "--top-k", "1"], capture_output=True, text=True,
                          cwd=bundle, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        expected = ov_files["qmodel"](pico_model.preprocess(torch.from_numpy(pico_model.images[:1]))).numpy().argmax()
    out = json.loads(proc.stdout)
    assert out["backend"] == "openvino" and out["predictions"][0]["top"][0]["label"] == pico_model.classes[expected]
    bench = subprocess.run([str(openvino_only_env), "-m", "edgekd.runtime", "bench", ".", "--runs", "5", "--batch", "1", "--batch", "4", "--json"],
                           capture_output=True, text=True, cwd=bundle, env=env)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert [r["batch"] for r in json.loads(bench.stdout)["latency"]] == [1, 4]
    assert np.isfinite(json.loads(bench.stdout)["latency"][0]["p50_ms"])
