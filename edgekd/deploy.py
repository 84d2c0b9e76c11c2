"""Deploy a bundle to a device over SSH, check it there, build the engine there, time it there.

The shipped artifact is what gets measured (the main lesson from the anchor tools' issue
trackers): the bundle is verified locally, streamed to the device, verified again by the runtime
inside it (``python3 -m edgekd.runtime selfcheck``: checksums, load, same top-1 as the host on the
bundle's reference images), the TensorRT engine is built on the device with the bundle's own
``engine/build_engine.sh`` when ``trtexec`` exists (engines are tied to the GPU and TensorRT
version), and latency percentiles are measured on the device. Results come back as a dict and,
when a run folder is given, as the manifest's ``deploy`` stage.

>>> from edgekd.runners.ssh import SshDevice
>>> deploy("runs/x/bundle.tar.gz", SshDevice("jetson@192.168.1.20", known_hosts=Path("kh")))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd import ui
from edgekd.bundle import load_bundle_meta, tar_bytes
from edgekd.errors import EdgekdError
from edgekd.manifest import Manifest
from edgekd.atomic import sha256_json, write_json_atomic
from edgekd.runners.ssh import SshDevice
from edgekd.runtime import BUNDLE_JSON, sha256_file

if TYPE_CHECKING:
    from edgekd.runners.timing import TimingPlan

DEPLOY_STAGE = "deploy"
GPU_TIME_RE = re.compile(r"GPU Compute Time: (.*)")
STAT_RE = re.compile(r"(min|max|mean|median|percentile\((\d+)%\))\s*=\s*([0-9.eE+-]+)\s*ms")
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}


def parse_trtexec_times(log: str) -> dict[str, float]:
    """trtexec's 'GPU Compute Time' summary -> {'min_ms':..., 'median_ms':..., 'p90_ms':..., ...}."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        m = GPU_TIME_RE.search(line)
        if not m:
            continue
        for stat, pct, value in STAT_RE.findall(m.group(1)):
            out[f"p{pct}_ms" if pct else f"{stat}_ms"] = float(value)
    return out


# TensorRT 8.x/10.x builder warnings for layers placed off the DLA, e.g.
#   [W] [TRT] Layer '/features/Conv' (CONVOLUTION): Unsupported on DLA. Switching this layer's device type to GPU.
#   [W] [TRT] Default DLA is enabled but layer /head/Gemm is not supported on DLA, falling back to GPU.
DLA_FALLBACK_RES = (re.compile(r"Layer '?(.+?)'? \([A-Z_]+\): Unsupported on DLA"), re.compile(r"layer (\S+) is not supported on DLA, falling back to GPU"))


def parse_dla_fallback(log: str) -> list[str]:
    """Names of the layers trtexec moved from the DLA to the GPU, in log order, each once."""
    found: list[str] = []
    for line in log.splitlines():
        for rx in DLA_FALLBACK_RES:
            m = rx.search(line)
            if m and m.group(1) not in found:
                found.append(m.group(1))
    return found


def remote_json(device: SshDevice, command: str, timeout: float) -> dict[str, Any]:
    """Run a runtime command that prints one JSON object; exit 1 (check failed) still has JSON."""
    proc = device.run(command, timeout=timeout, check=False)
    stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if proc.returncode == 127:
        raise EdgekdError(f"on {device.describe()}: '{device.python}' not found", "pass --python with the device's interpreter (it needs numpy, pillow, onnxruntime)")
    if proc.returncode not in (0, 1):
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named" in stderr:
            raise EdgekdError(f"on {device.describe()}: {last}", "pip install numpy pillow onnxruntime on the device (torch is not needed)")
        raise EdgekdError(f"on {device.describe()}: runtime failed (exit {proc.returncode}): {last}", "run the same command over ssh to see the full output")
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        raise EdgekdError(f"on {device.describe()}: runtime printed no JSON result", f"stderr: {stderr.strip()[-300:]}") from exc


def build_engine_remote(device: SshDevice, remote_dir: str, timeout: float) -> dict[str, Any]:
    """Run engine/build_engine.sh on the device when trtexec is there; bring back the timings."""
    d = shlex.quote(remote_dir)
    probe = device.run("command -v trtexec || for p in /usr/src/tensorrt/bin/trtexec /opt/tensorrt/bin/trtexec; do test -x $p && echo $p && break; done", check=False)
    trtexec = probe.stdout.decode().strip()
    if probe.returncode != 0 or not trtexec:
        return {"built": False, "reason": "trtexec not found on the device (JetPack puts it at /usr/src/tensorrt/bin/trtexec)"}
    t0 = time.time()
    device.run(f"cd {d} && sh engine/build_engine.sh", timeout=timeout)
    result: dict[str, Any] = {"built": True, "trtexec": trtexec, "seconds": round(time.time() - t0, 1)}
    build_log = device.run(f"cat {d}/engine/build.log", check=False).stdout.decode(errors="replace")
    fallback = parse_dla_fallback(build_log)
    if fallback:
        result["dla_fallback_layers"] = fallback
        ui.warn(f"{len(fallback)} layer(s) fall back from the DLA to the GPU on {device.describe()}: {', '.join(fallback[:10])}" + (" ..." if len(fallback) > 10 else ""))
    for key in ("bench_batch1", "bench_batch"):
        log = device.run(f"cat {d}/engine/{key}.log", check=False).stdout.decode(errors="replace")
        if log:
            result[key] = {"gpu_compute_time": parse_trtexec_times(log)}
    return result


def deploy(
    bundle: str | os.PathLike,
    device: SshDevice,
    remote_dir: str | None = None,
    runs: int = 200,
    warmup: int = 20,
    build_engine: bool = True,
    run_dir: str | os.PathLike | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Copy, check, (build,) and time a bundle on ``device``; return the results as a dict."""
    root, meta = load_bundle_meta(bundle)
    target = meta.get("target") or {}
    remote_dir = remote_dir or f"edgekd-bundles/{meta['name']}"
    if remote_dir.strip("/ ") in ("", ".", "~") or ".." in Path(remote_dir).parts:
        raise EdgekdError(f"--remote-dir '{remote_dir}' is not a bundle folder", "name a dedicated folder, e.g. edgekd-bundles/mymodel (it is replaced)")
    ui.log(f"deploy: checking {device.describe()}")
    uname = device.check()
    arch = ARCH_ALIASES.get(uname, uname)
    if target.get("arch") and target["arch"] != arch:
        ui.warn(f"bundle target {target.get('name')} is {target['arch']} but {device.describe()} is {arch}: latency will not be the target's")
    started = time.time()
    data = tar_bytes(root)
    ui.log(f"deploy: copying {len(data) / 1024:.0f} KiB to {device.describe()}:{remote_dir}")
    device.upload_tar(data, remote_dir, strip_components=1, timeout=timeout)
    copy_s = time.time() - started
    py = f"cd {shlex.quote(remote_dir)} && {shlex.quote(device.python)} -m edgekd.runtime"
    ui.log("deploy: selfcheck on the device")
    check = remote_json(device, f"{py} selfcheck . --json", timeout)
    if not check.get("ok"):
        ref = check.get("reference", {})
        raise EdgekdError(f"selfcheck failed on {device.describe()}: top-1 agreement with the host {ref.get('top1_agreement')} (max |diff| {ref.get('max_abs_diff')})",
                          "the device runs a different numeric path; compare runtimes/versions in the selfcheck output")
    engine = {"built": False, "reason": "not a TensorRT target"}
    if target.get("runtime") == "tensorrt":
        engine = build_engine_remote(device, remote_dir, timeout) if build_engine else {"built": False, "reason": "--no-engine"}
    ui.log(f"deploy: timing on the device ({runs} runs)")
    bench = remote_json(device, f"{py} bench . --json --runs {int(runs)} --warmup {int(warmup)}", timeout)
    result = {"device": device.describe(), "arch": arch, "remote_dir": remote_dir, "bundle": meta["name"], "target": target.get("name"),
              "bundle_sha256": _bundle_digest(root), "copy_seconds": round(copy_s, 2), "selfcheck": check, "engine": engine, "bench": bench,
              "seconds": round(time.time() - started, 2)}
    if run_dir is not None:
        record_in_manifest(run_dir, result)
    return result


def remote_bench(model: str | os.PathLike, target: str, batch: int, plan: TimingPlan, threads: int | None = None,
                 device: SshDevice | None = None, remote_dir: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Time a bundle on ``device`` (the hook `edgekd bench --remote` calls): copy it, verify it there,
    run ``edgekd.runtime bench --samples`` there with ``plan``'s warm-up and run counts (its
    ``duration_s`` is not used: the device times a fixed number of runs), and return the raw samples
    plus the device's fingerprint so the host computes statistics and regression decisions exactly as
    for local runs."""
    if device is None:
        raise EdgekdError("remote benchmarking needs a device", "pass --host user@device (and --known-hosts / --identity as for `edgekd deploy`)")
    root, meta = load_bundle_meta(model)
    remote_dir = remote_dir or f"edgekd-bundles/{meta['name']}"
    device.check()
    device.upload_tar(tar_bytes(root), remote_dir, strip_components=1, timeout=timeout)
    py = f"cd {shlex.quote(remote_dir)} && {shlex.quote(device.python)} -m edgekd.runtime"
    opts = f" --threads {int(threads)}" if threads else ""
    got = remote_json(device, f"{py} bench . --json --samples --batch {int(batch)} --runs {int(plan.runs)} --warmup {int(plan.warmup)}{opts}", timeout)
    lat = got["latency"][0]
    info = got.get("device", {})
    fingerprint = {  # the same keys as edgekd.bench.fingerprint(), read on the device
        "machine": info.get("machine"), "os": info.get("system"), "cpu_model": info.get("cpu_model"), "cpu_cores_physical": info.get("cpus"),
        "cpu_cores_logical": info.get("cpus"), "gpu": None, "jetson_power_mode": info.get("nvpmodel"), "runtime": got.get("backend"),
        "providers": got.get("providers") or [], "device": "remote", "threads": threads,
        "software": {"python": info.get("python"), "numpy": info.get("numpy"), "onnxruntime": info.get("onnxruntime")},
        "host": device.describe(), "device_info": info,
    }
    return {"samples_ms": lat["samples_ms"], "threads": threads, "fingerprint": fingerprint, "fallback_reason": got.get("fallback_reason"), "target": target}


def _bundle_digest(root: Path) -> str:
    return sha256_file(root / BUNDLE_JSON)


def record_in_manifest(run_dir: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write deploy.json into the run folder and record it as the manifest's 'deploy' stage."""
    manifest = Manifest(run_dir)
    manifest.start(DEPLOY_STAGE, sha256_json({k: result[k] for k in ("device", "remote_dir", "bundle_sha256")}))
    path = write_json_atomic(Path(run_dir) / "deploy.json", result)
    latency = {f"device_p50_ms_b{r['batch']}": r["p50_ms"] for r in result["bench"].get("latency", [])}
    manifest.finish(DEPLOY_STAGE, {"result": path}, {"device": result["device"], "backend": result["bench"].get("backend"), **latency,
                                                     "reference_top1_agreement": result["selfcheck"].get("reference", {}).get("top1_agreement")})
    manifest.data["stages"][DEPLOY_STAGE]["seconds"] = result["seconds"]  # the deploy itself, not the bookkeeping
    manifest.save()
    return path
