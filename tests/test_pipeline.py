"""`edgekd build` end to end on a tiny real configuration: stages, manifest, skip, resume, bundle."""

import json
import os
import shutil

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, json_out, run_cli, run_inprocess, tiny_build
from edgekd.manifest import Manifest
from needs import needs_fmnist

pytestmark = needs_fmnist

TINY = tiny_build()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("build")
    out = work / "run"
    # a relative --out, as in the README's `edgekd build` (default runs/build); the CLI's entry point in
    # this process (the console script itself runs in test_ddp, test_budget_report and test_hardening)
    here = os.getcwd()
    os.chdir(work)
    try:
        res = json_out(run_inprocess("build", "--target", "x86-cpu", *TINY, "--out", "run", "--json"))
    finally:
        os.chdir(here)
    return out, res


def test_build_json_has_the_promised_fields(built):
    out, res = built
    for key in ("bundle", "onnx", "target", "accuracy", "params", "latency_ms", "stages"):
        assert key in res, key
    assert res["target"] == "x86-cpu" and res["precision"] == "int8" and res["layout"] == "ort-cpu"
    assert set(res["stages"]) == {"teacher", "control", "distill", "qad", "export", "evaluate", "bench", "report", "bundle"}
    assert all(s["status"] == "done" for s in res["stages"].values())
    assert 0.3 < res["accuracy"] <= 1.0 and res["params"] < 100_000 and res["latency_ms"] > 0
    assert os.path.isfile(res["onnx"]) and os.path.isdir(res["bundle"]) and os.path.isfile(res["bundle_tar"])
    assert Manifest(out).verify() == []


def test_x86_build_benches_every_cpu_runtime_and_says_which_is_faster(built):
    """`build --target x86-cpu` times the shipped INT8 and the FP32 file on onnxruntime and (installed in dev) OpenVINO; the report shows both."""
    pytest.importorskip("openvino")
    out, _ = built
    cpu = json.loads((out / "bench.json").read_text())["metrics"]["cpu_runtimes"]
    assert set(cpu["runtimes"]) == {"ort-cpu", "openvino"}
    for rows in cpu["runtimes"].values():
        assert set(rows) == {"1", "8", "64"} and all(r["int8_ms"] > 0 and r["fp32_ms"] > 0 for r in rows.values())  # 64: the target's batch
    md = (out / "report" / "report.md").read_text()
    assert cpu["verdict"].startswith("INT8 is fastest on ") and cpu["verdict"] in md
    assert "| ort-cpu | 8 |" in md and "| openvino | 8 |" in md


def test_accuracy_is_measured_on_the_exported_file(built):
    """The build's accuracy is the ONNX file's own test top-1, recomputed here independently."""
    import onnxruntime as ort

    from edgekd.data import Preprocess, load_dataset

    out, res = built
    data = load_dataset("fashion-mnist", test_subset=500)
    sess = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["preprocessing"])
    x = Preprocess.from_dict(meta)(data.test.images).numpy()
    top1 = float((sess.run(None, {"input": x})[0].argmax(1) == data.test.labels.numpy()).mean())
    assert abs(top1 - res["accuracy"]) < 1e-9


def _artifact_stamps(out) -> dict[str, int]:
    """mtime (ns) of every file a stage wrote: any stage that ran again would rewrite its outputs."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in ("manifest.json", "build.log", ".lock")}


def test_second_build_does_no_work(built):
    """Rerun with the same settings: every stage is skipped and no artifact is written again."""
    out, first = built
    before = _artifact_stamps(out)
    res = json_out(run_inprocess("build", "--target", "x86-cpu", *TINY, "--out", out, "--json"))
    assert all(s["status"] == "skipped" for s in res["stages"].values()), res["stages"]
    assert res["accuracy"] == first["accuracy"] and res["onnx"] == first["onnx"]
    assert len(before) > 10 and _artifact_stamps(out) == before


def test_changing_a_late_setting_reruns_only_later_stages(built, tmp_path):
    out, _ = built
    res = json_out(run_inprocess("build", "--target", "x86-cpu", *TINY, "--set", "bench.runs=25", "--out", out, "--json", "--until", "bench"))
    status = {k: v["status"] for k, v in res["stages"].items()}
    assert status["teacher"] == status["distill"] == status["qad"] == status["export"] == "skipped"
    assert status["bench"] == "done"


def test_a_changed_distill_setting_retrains_the_student_from_scratch(built, tmp_path):
    """The copy's student/last.pt was written with other distillation settings: the stage starts
    over instead of refusing to resume it (or continuing it)."""
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    res = json_out(run_inprocess("build", "--target", "x86-cpu", *TINY, "--set", "distill.temperature=2", "--out", out, "--json", "--until", "distill"))
    status = {k: v["status"] for k, v in res["stages"].items()}
    assert status["teacher"] == status["control"] == "skipped" and status["distill"] == "done"
    assert json.loads((out / "student" / "metrics.json").read_text())["resumed_from_epoch"] is None and Manifest(out).verify() == []


def test_bundle_round_trip_predicts_like_the_pipeline(built, tmp_path):
    """tar -> untar elsewhere -> the torch-free runtime predicts what the pipeline's own
    preprocessing + the exported ONNX predict, on real test images."""
    import onnxruntime as ort

    from edgekd import runtime
    from edgekd.data import Preprocess, load_dataset

    out, res = built
    root = runtime.safe_extract(res["bundle_tar"], tmp_path / "device")
    clf = runtime.Classifier(runtime.bundle_root(root), backend="ort")
    images = load_dataset("fashion-mnist", test_subset=64).test.images
    probs = clf.predict_u8(images.numpy())
    sess = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    pre = Preprocess.from_dict(json.loads(sess.get_modelmeta().custom_metadata_map["preprocessing"]))
    ref = sess.run(None, {"input": pre(images).numpy()})[0]
    assert np.array_equal(probs.argmax(1), ref.argmax(1))
    assert clf.classes == json.loads(sess.get_modelmeta().custom_metadata_map["classes"])


def test_jetson_target_leaves_a_tensorrt_ready_bundle(tmp_path):
    """Also with a layer pinned to FP16 by hand and an accuracy budget: the graph is still ready
    (the pinned layer is listed as kept in FP16), and the bundle's engine script names it."""
    res = json_out(run_inprocess("build", "--target", "jetson", *TINY, "--exclude", "features.2.0", "--max-accuracy-drop", "0",
                                 "--out", tmp_path / "j", "--json"))
    assert res["target"] == "jetson-orin-nano" and res["layout"] == "tensorrt"
    assert res["checks"]["tensorrt_readiness"] is True
    assert "build_engine.sh" in res["device_build"]
    script = (tmp_path / "j" / "bundle" / "engine" / "build_engine.sh").read_text()
    assert "#   features.2.0" in script and "--fp16" in script
    assert res["latency"]["on_target_runtime"] is False  # no GPU here: timed on onnxruntime CPU, and says so
    qad = json.loads((tmp_path / "j" / "manifest.json").read_text())["stages"]["qad"]["metrics"]
    assert "features.2.0" in qad["float_layers"] and qad["accuracy_budget"]["budget_points"] == 0
    export = json.loads((tmp_path / "j" / "export" / "export.json").read_text())
    assert export["checks"]["tensorrt_readiness"]["kept_float"][0] == "features.2.0"
    assert json.loads((tmp_path / "j" / "bundle" / "bundle.json").read_text())["float_layers"] == qad["float_layers"]
    rows = [r["step"] for r in res["report"]["accuracy"]]
    assert any("kept float" in step for step in rows), rows


@pytest.mark.slow
def test_unknown_target_and_bad_recipe(tmp_path):
    assert_one_line_error(run_inprocess("build", "--target", "jetson-nope", "--out", tmp_path / "x"), "unknown target 'jetson-nope'")
    bad = tmp_path / "r.yaml"
    bad.write_text("student:\n  modle: nano_cnn\n")
    assert_one_line_error(run_inprocess("build", "-c", bad, "--out", tmp_path / "x"), "student.modle: unknown key")


def test_print_config_shows_every_default():
    proc = run_cli("build", "--print-config", "--set", "student.train.epochs=7")
    assert proc.returncode == 0
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["student"]["train"]["epochs"] == 7 and cfg["teacher"]["model"] == "efficientnet_lite0" and "quantize" in cfg
