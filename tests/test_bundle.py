"""Bundles: round trip through tar to the torch-free runtime, tamper refusal, safe extraction."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgekd import runtime as rt
from edgekd.bundle import BundleModel, make_bundle, tar_bytes, tar_bundle, trtexec_commands
from edgekd.bundle.scripts import build_engine_script
from edgekd.errors import EdgekdError
from edgekd.targets import get_target

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(pico_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "pico-bundle"
    path = make_bundle(out, BundleModel({"pico": pico_model.onnx}, "pico", pico_model.classes, pico_model.preprocess), get_target("x86-cpu"),
                       {"test_top1": 0.7}, {"note": "test"}, sample_images=pico_model.images[:16])
    return path


def _torch_logits(model, images_u8: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(model.preprocess(torch.from_numpy(images_u8))).numpy()


def test_round_trip_through_tar_predicts_like_onnxruntime_and_torch(bundle, pico_model, tmp_path):
    tar = bundle.with_name(bundle.name + ".tar.gz")
    assert tar.is_file()
    clf = rt.Classifier(tar, workdir=tmp_path / "elsewhere")
    assert clf.root.parent == (tmp_path / "elsewhere").resolve() and clf.backend == "onnxruntime"
    images = pico_model.images[:64]
    got = clf.predict_u8(images)
    sess = ort.InferenceSession(str(pico_model.onnx), providers=["CPUExecutionProvider"])
    x = pico_model.preprocess(torch.from_numpy(images)).numpy()
    ort_logits = sess.run(None, {"input": x})[0]
    torch_logits = _torch_logits(pico_model.model, images)
    np.testing.assert_allclose(np.log(got), np.log(rt.softmax(ort_logits)), atol=1e-5)
    assert (got.argmax(1) == ort_logits.argmax(1)).all()
    assert (got.argmax(1) == torch_logits.argmax(1)).all()
    np.testing.assert_allclose(clf.logits(x), torch_logits, atol=1e-4)
    # The model is trained on real data, so the comparison is not between near-ties.
    assert (got.argmax(1) == pico_model.labels[:64]).mean() > 0.5


def test_image_files_go_through_the_same_pipeline(bundle, pico_model, tmp_path):
    from PIL import Image

    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(pico_model.images[i, 0]).save(p)
        paths.append(p)
    clf = rt.Classifier(bundle)
    preds, every = clf.classify_files(paths, top_k=3), clf.classify_files(paths, top_k=len(pico_model.classes))
    torch_top1 = _torch_logits(pico_model.model, pico_model.images[:4]).argmax(1)
    assert [p[0][0] for p in preds] == [pico_model.classes[i] for i in torch_top1]
    for top3, full in zip(preds, every):
        probs = [pr for _, pr in full]
        # all classes form a distribution, ranked; top-3 is its head, not a re-normalised or re-ordered copy
        assert abs(sum(probs) - 1.0) < 1e-5 and probs == sorted(probs, reverse=True) and len({c for c, _ in full}) == len(full)
        assert top3 == full[:3]


@pytest.mark.parametrize("src, size, channels", [((3, 40, 52), 28, 1), ((1, 28, 28), 64, 3), ((3, 224, 224), 64, 3), ((1, 28, 28), 28, 1)])
def test_numpy_preprocess_matches_data_preprocess(src, size, channels):
    from edgekd.data import Preprocess

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, *src), dtype=np.uint8)
    mean, std = ((0.3,), (0.35,)) if channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pre = Preprocess(size, channels, mean, std)
    expected = pre(torch.from_numpy(images)).numpy()
    got = rt.preprocess(images, pre.to_dict())
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_runtime_import_and_cli_stay_torch_free(bundle, pico_model, tmp_path):
    code = "import sys, edgekd.runtime; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout.strip() == "ok"
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(pico_model.images[0, 0]).save(img)
    # Run the copy inside the bundle, as a device does: its own edgekd/ package shadows any installed one.
    proc = subprocess.run([sys.executable, "-m", "edgekd.runtime", ".", str(img), "--json", "--top-k", "2"], capture_output=True, text=True, cwd=bundle)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["predictions"][0]["top"][0]["label"] == pico_model.classes[_torch_logits(pico_model.model, pico_model.images[:1]).argmax()]
    check = subprocess.run([sys.executable, "-m", "edgekd.runtime", "selfcheck", ".", "--json"], capture_output=True, text=True, cwd=bundle)
    res = json.loads(check.stdout)
    assert check.returncode == 0 and res["ok"] and res["reference"]["top1_agreement"] == 1.0 and res["device"]["torch_loaded"] is False


JETPACK5_PYTHON = "3.8"  # JetPack 5 (L4T r35) ships Python 3.8; the bundle's runtime must run there


def _python38() -> str | None:
    import shutil

    for candidate in (shutil.which(f"python{JETPACK5_PYTHON}"), f"/root/.pyenv/versions/{JETPACK5_PYTHON}.18/bin/python"):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"], capture_output=True, text=True)
            if probe.stdout.strip() == "True":
                return candidate
    return None


@pytest.fixture(scope="session")
def py38_runtime_env() -> Path:
    """A Python 3.8 venv with only what a device needs (numpy, pillow, onnxruntime 1.19: the last
    release for 3.8), cached in .edgekd-cache/ across runs."""
    py = _python38()
    if py is None:
        pytest.skip("no Python 3.8 interpreter here (JetPack 5's Python); the runtime is checked on this Python only")
    venv = REPO / ".edgekd-cache" / "py38-runtime"
    exe = venv / "bin" / "python"
    if not (venv / "ready").is_file():
        subprocess.run([py, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        pip = subprocess.run([str(exe), "-m", "pip", "install", "-q", "numpy<2", "onnxruntime<1.20", "pillow<11"], capture_output=True, text=True)
        if pip.returncode != 0:
            pytest.skip(f"cannot install numpy/onnxruntime/pillow for Python 3.8 here: {pip.stderr.strip().splitlines()[-1:]}")
        (venv / "ready").write_text("numpy<2 onnxruntime<1.20 pillow<11\n")
    return exe


def test_bundle_runtime_runs_on_jetpack5_python(bundle, pico_model, tmp_path, py38_runtime_env):
    """The bundle's own edgekd/ runtime on Python 3.8 with onnxruntime 1.19: selfcheck (checksums,
    load, reference outputs), classification of an image file, and bench, with no torch anywhere."""
    import shutil

    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(pico_model.images[0, 0]).save(img)
    bundle = shutil.copytree(bundle, tmp_path / "bundle")  # a device writes __pycache__ next to the runtime; keep the shared fixture pristine
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    check = subprocess.run([str(py38_runtime_env), "-m", "edgekd.runtime", "selfcheck", ".", "--json"], capture_output=True, text=True, cwd=bundle, env=env)
    assert check.returncode == 0, check.stderr[-2000:]
    res = json.loads(check.stdout)
    assert res["ok"] and res["device"]["python"].startswith("3.8.") and res["device"]["torch_loaded"] is False
    assert res["reference"]["top1_agreement"] == 1.0
    proc = subprocess.run([str(py38_runtime_env), "-m", "edgekd.runtime", ".", str(img), "--json", "--top-k", "1"], capture_output=True, text=True, cwd=bundle, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["predictions"][0]["top"][0]["label"] == pico_model.classes[_torch_logits(pico_model.model, pico_model.images[:1]).argmax()]
    bench = subprocess.run([str(py38_runtime_env), "-m", "edgekd.runtime", "bench", ".", "--runs", "5", "--json"], capture_output=True, text=True, cwd=bundle, env=env)
    assert bench.returncode == 0 and json.loads(bench.stdout)["latency"][0]["p50_ms"] > 0, bench.stderr[-2000:]


def test_bench_reports_percentiles_and_budget(bundle):
    res = rt.bench(bundle, runs=20, warmup=2)
    batches = [r["batch"] for r in res["latency"]]
    assert batches == [1, 64]
    for r in res["latency"]:
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["budget_ms"] in (1.0, 20.0) and isinstance(r["within_budget"], bool)


def test_host_bench_verifies_the_bundle_before_timing_it(bundle, tmp_path):
    import shutil

    from cli_helpers import assert_one_line_error, json_out, run_cli, run_inprocess

    res = json_out(run_cli("bench", bundle, "--runtime", "ort-cpu", "-b", "1", "--runs", "10", "--warmup", "1", "--json"))
    assert res["p50_ms"] > 0
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    onnx_file = next((copy / "model").glob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    assert_one_line_error(run_inprocess("bench", copy, "--runtime", "ort-cpu", "-b", "1", "--runs", "10"), "was modified: sha256 does not match")


def test_bundle_contents_and_manifest(bundle, pico_model):
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["classes"] == pico_model.classes and (bundle / "labels.txt").read_text().split("\n")[:10] == pico_model.classes
    assert meta["preprocess"] == pico_model.preprocess.to_dict()
    assert meta["target"]["name"] == "x86-cpu" and meta["metrics"] == {"test_top1": 0.7} and meta["extra"] == {"note": "test"}
    sums = rt.read_sums(bundle)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == on_disk
    assert all(meta["files"][rel]["sha256"] == sums[rel] for rel in meta["files"])
    assert "trtexec" not in meta  # CPU target: no engine


def test_tar_is_deterministic(bundle, tmp_path):
    assert tar_bytes(bundle) == tar_bytes(bundle)
    a, b = tar_bundle(bundle, tmp_path / "a.tar.gz"), tar_bundle(bundle, tmp_path / "b.tar.gz")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        assert all(m.mtime == 0 and m.uid == 0 and not m.issym() for m in tar.getmembers())


@pytest.mark.parametrize("victim", ["model/pico.onnx", "labels.txt", "edgekd/runtime/classifier.py", "bundle.json"])
def test_tampered_file_is_refused(bundle, tmp_path, victim):
    copy = tmp_path / "copy"
    rt.safe_extract(bundle.with_name(bundle.name + ".tar.gz"), copy)
    root = rt.bundle_root(copy)
    p = root / victim
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(EdgekdError, match=f"bundle file {victim} was modified"):
        rt.Classifier(root)
    proc = subprocess.run([sys.executable, "-m", "edgekd.runtime", "selfcheck", str(root)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "was modified" in proc.stderr


def test_removed_file_and_unsafe_sums_are_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    rt.safe_extract(bundle.with_name(bundle.name + ".tar.gz"), copy)
    root = rt.bundle_root(copy)
    (root / "labels.txt").unlink()
    with pytest.raises(EdgekdError, match="labels.txt is missing"):
        rt.verify_bundle(root)
    (root / "SHA256SUMS").write_text("0" * 64 + "  ../../etc/passwd\n")
    with pytest.raises(EdgekdError, match="unsafe path"):
        rt.verify_bundle(root)


def _malicious_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"pwned") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("bundle/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = linkname
    return m


@pytest.mark.parametrize("member, why", [
    (_member("/tmp/edgekd-evil-abs.txt"), "absolute path"),
    (_member("bundle/../../edgekd-evil-dotdot.txt"), "'..'"),
    (_member("bundle/link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (_member("bundle/hard", tarfile.LNKTYPE, "/etc/passwd"), "link"),
    (_member("bundle/dev", tarfile.CHRTYPE), "special file"),
    (_member("bundle/fifo", tarfile.FIFOTYPE), "special file"),
])
def test_malicious_tars_cannot_write_outside(tmp_path, member, why):
    tar = _malicious_tar(tmp_path / "evil.tar.gz", member)
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(EdgekdError, match=why):
        rt.safe_extract(tar, dest)
    # Nothing at all was extracted (checks run before the first write), and nothing escaped.
    assert not any(dest.rglob("*"))
    assert not Path("/tmp/edgekd-evil-abs.txt").exists() and not (tmp_path / "edgekd-evil-dotdot.txt").exists()
    with pytest.raises(EdgekdError):
        rt.Classifier(tar, workdir=tmp_path / "w")


def test_trtexec_commands_for_dla_and_gpu_targets(pico_model):
    nx = get_target("jetson-orin-nx").to_dict()
    cmds = trtexec_commands(nx, "model/pico.onnx", "input", [None, 1, 28, 28], "pico")
    build = cmds["build"]
    assert build[:3] == ["trtexec", "--onnx=model/pico.onnx", "--saveEngine=engine/pico.plan"]
    # the DLA takes no dynamic dimension: one static engine per batch (min = opt = max), each timed on its own shape
    for flag in ("--int8", "--fp16", "--minShapes=input:8x1x28x28", "--optShapes=input:8x1x28x28", "--maxShapes=input:8x1x28x28",
                 "--useDLACore=0", "--allowGPUFallback", "--timingCacheFile=engine/timing.cache"):
        assert flag in build
    b1 = cmds["build_batch1"]
    assert "--saveEngine=engine/pico.b1.plan" in b1 and {"--minShapes=input:1x1x28x28", "--optShapes=input:1x1x28x28", "--maxShapes=input:1x1x28x28"} <= set(b1)
    assert "--loadEngine=engine/pico.b1.plan" in cmds["bench_batch1"] and "--loadEngine=engine/pico.plan" in cmds["bench_batch"]
    assert not any(a.startswith("--shapes=") for key in ("bench_batch1", "bench_batch", "profile") for a in cmds[key])  # a static engine runs its own shape
    assert "--useCudaGraph" not in cmds["bench_batch1"]  # no CUDA graphs with DLA
    assert {"--separateProfileRun", "--dumpProfile"} <= set(cmds["profile"])
    assert all("--percentile=50,90,95,99" in cmds[k] for k in ("bench_batch1", "bench_batch"))  # deploy reports p50 and p90
    script = build_engine_script(cmds, nx)
    assert script.index("engine/build.log") < script.index("engine/build_batch1.log") < script.index("engine/bench_batch1.log")
    nano = trtexec_commands(get_target("jetson").to_dict(), "model/pico.onnx", "input", [None, 1, 28, 28], "pico")
    assert "--useCudaGraph" in nano["bench_batch1"] and "--noDataTransfers" in nano["bench_batch1"]
    assert "--minShapes=input:1x1x28x28" in nano["build"] and "--maxShapes=input:8x1x28x28" in nano["build"] and "build_batch1" not in nano
    assert "--shapes=input:1x1x28x28" in nano["bench_batch1"] and "--shapes=input:8x1x28x28" in nano["bench_batch"]  # one dynamic GPU engine
    assert "--percentile=50,90,95,99" in nano["bench_batch1"]
    assert not any(a.startswith("--useDLACore") for a in nano["build"])
    assert any(a.startswith("--warmUp=") for a in nano["bench_batch1"]) and any(a.startswith("--duration=") for a in nano["bench_batch1"])
    xavier = trtexec_commands(get_target("jetson-xavier-nx").to_dict(), "model/pico.onnx", "input", [None, 1, 28, 28], "pico")
    assert xavier["build"][-1] == "--buildOnly" and {"--int8", "--fp16"} <= set(xavier["build"])  # TensorRT 8.5 spelling
    trt11 = trtexec_commands({**get_target("jetson").to_dict(), "tensorrt": "11.1"}, "model/pico.onnx", "input", [None, 1, 28, 28], "pico")
    assert not {"--int8", "--fp16"} & set(trt11["build"])  # trtexec 11 has no --int8/--fp16: strongly typed, the Q/DQ decide
    fp16_dla = trtexec_commands({**nx, "precision": "fp16"}, "model/pico.onnx", "input", [None, 1, 28, 28], "pico")
    assert "--fp16" in fp16_dla["build"] and "--int8" not in fp16_dla["build"]
    fixed = trtexec_commands(get_target("jetson").to_dict(), "model/pico.onnx", "input", [1, 1, 28, 28], "pico")
    assert not any("Shapes=" in a for a in fixed["build"])  # static graphs refuse explicit shapes
    fixed_dla = trtexec_commands(nx, "model/pico.onnx", "input", [4, 1, 28, 28], "pico")  # a user's fixed batch of 4 on the DLA
    assert list(k for k in fixed_dla if k.startswith("build")) == ["build"] and not any("hapes=" in a for v in fixed_dla.values() for a in v)


def test_tensorrt_bundle_has_build_script(pico_model, tmp_path):
    b = make_bundle(tmp_path / "jb", BundleModel({"pico": pico_model.onnx}, "pico", pico_model.classes, pico_model.preprocess), get_target("jetson"), {},
                    make_tar=False)
    script = (b / "engine" / "build_engine.sh").read_text()
    meta = json.loads((b / "bundle.json").read_text())
    assert "--saveEngine=engine/pico.plan" in script and "nvpmodel -m 0" in script and meta["trtexec"]["build"][0] == "trtexec"
    assert (b / "engine" / "build_engine.sh").stat().st_mode & 0o111
    assert not (tmp_path / "jb.tar.gz").exists()
    clf = rt.Classifier(b)  # no TensorRT here: onnxruntime, with the reason recorded
    assert clf.backend == "onnxruntime" and clf.fallback_reason


def test_make_bundle_refuses_bad_inputs_and_replaces_atomically(pico_model, tmp_path):
    with pytest.raises(EdgekdError, match="primary model"):
        make_bundle(tmp_path / "x", BundleModel({"pico": pico_model.onnx}, "other", pico_model.classes, pico_model.preprocess), None)
    with pytest.raises(EdgekdError, match="not found"):
        make_bundle(tmp_path / "x", BundleModel({"pico": tmp_path / "missing.onnx"}, "pico", pico_model.classes, pico_model.preprocess), None)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    first = make_bundle(tmp_path / "x", BundleModel({"pico": pico_model.onnx}, "pico", pico_model.classes, pico_model.preprocess), None, {"v": 1},
                        make_tar=False)
    make_bundle(tmp_path / "x", BundleModel({"pico": pico_model.onnx}, "pico", pico_model.classes, pico_model.preprocess), None, {"v": 2}, make_tar=False)
    assert json.loads((first / "bundle.json").read_text())["metrics"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


@pytest.mark.tensorrt
def test_tensorrt_engine_in_bundle_matches_onnxruntime(pico_model, tmp_path):
    """Where a GPU and TensorRT exist: build the engine the device way and run it through the runtime."""
    from edgekd.targets import nvidia_gpu_present

    why = rt.tensorrt_usable()
    if why or not nvidia_gpu_present():
        pytest.skip(f"needs TensorRT and an NVIDIA GPU ({why or 'no GPU'})")
    import tensorrt as trt

    b = make_bundle(tmp_path / "trt", BundleModel({"pico": pico_model.onnx}, "pico", pico_model.classes, pico_model.preprocess), get_target("x86-cuda"), {},
                    make_tar=False)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((b / "model" / "pico.onnx").read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 1, 28, 28), (8, 1, 28, 28), (64, 1, 28, 28))
    config.add_optimization_profile(profile)
    (b / "engine" / "pico.plan").write_bytes(bytes(builder.build_serialized_network(network, config)))
    trt_clf, ort_clf = rt.Classifier(b, backend="tensorrt"), rt.Classifier(b, backend="ort")
    assert trt_clf.backend == "tensorrt"
    x = rt.preprocess(pico_model.images[:32], trt_clf.pre)
    np.testing.assert_allclose(trt_clf.logits(x), ort_clf.logits(x), atol=1e-2)
    assert (trt_clf.logits(x).argmax(1) == ort_clf.logits(x).argmax(1)).mean() >= 0.97
