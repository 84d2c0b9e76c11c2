"""The parts of benchmarks/gpu_check.sh (read its header); one results JSON, each part ok / skipped (why) / failed (error).

Runs without edgekd's dependencies too: then only the environment and a plain-PyTorch CUDA/AMP
training smoke run, and every edgekd part says it was skipped and why. That is why every edgekd
import here is inside the part that needs it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEP_SETS = ["data.train_subset=6000", "data.test_subset=1000", "teacher.train.epochs=3", "student.train.epochs=3", "quantize.train.epochs=3"]


class Skip(Exception):
    """A part that cannot run here; its message is the reason."""


def _need(module: str, why: str) -> None:
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        raise Skip(f"{why}: cannot import {module} ({type(exc).__name__}: {str(exc)[:120]})") from exc


def environment() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True) \
        if _which("nvidia-smi") else None
    out["nvidia_smi"] = smi.stdout.strip() if smi and smi.returncode == 0 else "not found"
    try:
        import torch

        out |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except ImportError:
        out["torch"] = None
    for mod in ("timm", "onnx", "onnxruntime", "modelopt", "tensorrt", "edgekd"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"missing ({type(exc).__name__})"
    return out


def _which(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def torch_cuda_smoke() -> dict:
    """Plain PyTorch: 300 AMP steps of a small CNN on cuda (works where edgekd's dependencies are missing)."""
    import torch
    import torch.nn as nn

    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).cuda()
    opt, scaler = torch.optim.AdamW(net.parameters(), 1e-3), torch.amp.GradScaler("cuda")
    x, y = torch.randn(64, 1, 28, 28, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    t0 = time.time()
    for _ in range(300):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    return {"steps": 300, "seconds": round(time.time() - t0, 2), "final_loss": float(loss), "amp": True}


def _data_args(out: Path) -> list[str]:
    """Fashion-MNIST where it is; else a generated ImageFolder (the code path, not accuracy, is under test)."""
    from edgekd.data import fashion_mnist_root

    try:
        fashion_mnist_root(None)
        return []
    except Exception:  # noqa: BLE001 - missing data set: generate a folder
        import numpy as np
        from PIL import Image

        root, rng = out / "folder", np.random.default_rng(0)
        for c in ("a", "b", "c"):
            (root / c).mkdir(parents=True, exist_ok=True)
            for i in range(300):
                Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(root / c / f"{i}.png")
        return ["--dataset", "imagefolder", "--data-root", str(root), "--set", "data.train_subset=800"]


def build(out: Path) -> dict:
    """edgekd build --target x86-cuda --quick with ~300 steps per training stage, on cuda (AMP: TrainConfig.amp, on by default)."""
    _need("edgekd.pipeline", "edgekd or its dependencies are not installed")
    import torch

    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device: the CUDA training path cannot run")
    cmd = [sys.executable, "-m", "edgekd", "build", "--target", "x86-cuda", "--quick", "--out", str(out / "build"), "--json",
           *[a for s in STEP_SETS for a in ("--set", s)], *_data_args(out)]
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=330)
    (out / "build.log").write_text(run.stdout + "\n" + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"edgekd build exited {run.returncode}: {(run.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    manifest = json.loads((out / "build" / "manifest.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "command": " ".join(cmd[2:]), "stages": list(manifest.get("stages", {})),
            "summary": _tail_json(run.stdout)}


def _tail_json(text: str) -> object:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return text[-2000:]


def bundle_runtime(out: Path) -> dict:
    bundle = out / "build" / "bundle"
    if not bundle.is_dir():
        raise Skip("no bundle (the build part did not produce one)")
    res = {}
    for cmd in (["selfcheck", str(bundle)], ["bench", str(bundle), "--runs", "200"]):
        run = subprocess.run([sys.executable, "-m", "edgekd.runtime", *cmd, "--json"], capture_output=True, text=True, timeout=120)
        res[cmd[0]] = _tail_json(run.stdout) if run.returncode == 0 else {"exit": run.returncode, "stderr": run.stderr[-800:]}
    return res


def _test_images(out: Path):
    from edgekd.runtime.integrity import verify_bundle
    from edgekd.runtime.preprocessing import preprocess

    import numpy as np

    meta = verify_bundle(out / "build" / "bundle")
    ref = np.load(out / "build" / "bundle" / "reference" / "inputs.npy")
    return meta, preprocess(ref, meta["preprocess"])


def tensorrt_engines(out: Path) -> dict:
    """FP16 (from the FP32 ONNX) and INT8 (from the Q/DQ ONNX) engines vs onnxruntime, and timed."""
    from edgekd.runners import runtime_available

    ok, why = runtime_available("tensorrt")
    if not ok:
        raise Skip(f"TensorRT cannot run here: {why}")
    from edgekd.bench import BenchRequest, TimingPlan, run_bench
    from edgekd.export import agreement, ort_logits
    from edgekd.runners.tensorrt import TensorRTRunner

    int8 = Path(sorted(glob.glob(str(out / "build" / "**" / "model.onnx"), recursive=True))[0])
    fp32 = int8.with_name("model.fp32.onnx")
    _meta, x = _test_images(out)
    res = {}
    for precision, path, exact in (("fp16", fp32, False), ("int8", int8, True)):
        runner = TensorRTRunner(path, precision=precision, batch=len(x), max_batch=64)
        try:
            got = runner.outputs(runner.prepare({"input": x}))[0]
        finally:
            runner.close()
        bench = run_bench(BenchRequest(str(path), runtime="tensorrt", batches=[1, 64], plan=TimingPlan(50, 500),
                                       runtime_options={"precision": precision, "batch": 1, "max_batch": 64}))
        res[precision] = {"onnx": str(path), "agreement_vs_onnxruntime": agreement(ort_logits(path, x, exact_qdq=exact), got),
                          "p50_ms": bench["p50_ms"], "device_p50_ms": bench.get("device_p50_ms"),
                          "sweep": [{k: s.get(k) for k in ("batch", "p50_ms", "p90_ms", "device_p50_ms")} for s in bench.get("sweep", [])]}
    return res


def trt_batch_split(out: Path) -> dict:
    """The bundle runtime's TrtModel on a real engine whose profile ends at batch 4, fed more images than that."""
    from edgekd.runners import runtime_available

    ok, why = runtime_available("tensorrt")
    if not ok:
        raise Skip(f"TensorRT cannot run here: {why}")
    from edgekd.export import agreement, ort_logits
    from edgekd.runtime.backends import TrtModel
    from edgekd.runners.tensorrt import EngineOptions, build_engine

    int8 = Path(sorted(glob.glob(str(out / "build" / "**" / "model.onnx"), recursive=True))[0])
    engine = build_engine(int8, out / "split.engine", EngineOptions("int8", batch=2, max_batch=4, timing_cache=str(out / "split.cache")))
    _meta, x = _test_images(out)
    model = TrtModel(engine)
    got = model.run(x[:11])
    return {"images": 11, "engine_batches": [model.min_batch, model.max_batch], "agreement_vs_onnxruntime": agreement(ort_logits(int8, x[:11], exact_qdq=True), got)}


PARTS = {"environment": environment, "torch_cuda_amp": torch_cuda_smoke, "build": build, "bundle_runtime": bundle_runtime,
         "tensorrt_engines": tensorrt_engines, "trt_batch_split": trt_batch_split}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "gpu_check_results.json")
    ap.add_argument("--setup-notes", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="check prerequisites and print the plan; run nothing heavy")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    notes = [n for n in (args.setup_notes.read_text().splitlines() if args.setup_notes and args.setup_notes.is_file() else []) if n.strip()]
    if args.dry_run:
        env = environment()
        plan = {name: fn.__doc__.strip().splitlines()[0] if fn.__doc__ else name for name, fn in PARTS.items()}
        print(json.dumps({"dry_run": True, "environment": env, "plan": plan, "build_overrides": STEP_SETS}, indent=1))
        return
    results, t0 = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "setup_notes": notes}, time.time()
    for name, fn in PARTS.items():
        t = time.time()
        try:
            value = fn() if name in ("environment", "torch_cuda_amp") else fn(args.out)
            results[name] = {"status": "ok", "result": value}
        except Skip as s:
            results[name] = {"status": "skipped", "why": str(s)}
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
            results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:400]}", "trace": traceback.format_exc()[-1500:]}
        results[name]["seconds"] = round(time.time() - t, 1)
        print(f"{name}: {results[name]['status']} {results[name].get('why') or results[name].get('error') or ''}", flush=True)
    results["total_seconds"] = round(time.time() - t0, 1)
    args.results.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results: {args.results}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
