"""What a bundle tells the device to run: the trtexec engine build and timing commands
(``engine/build_engine.sh``), ``run.sh`` and the bundle's README."""


from __future__ import annotations

import json
import os
import shlex
from typing import Any, Mapping

from edgekd.errors import EdgekdError
from edgekd.runners.shapes import engine_batches, engine_profile, tensorrt_major, trtexec_precision_flags


DEFAULT_WARMUP_MS = 500
DEFAULT_DURATION_S = 10
PERCENTILES = "50,90,95,99"  # --percentile replaces trtexec's default list (90,95,99); deploy reports p50 and p90


def onnx_input(onnx_path: str | os.PathLike) -> tuple[str, list[int | None]]:
    """The model's first input name and shape (None for symbolic dims such as a dynamic batch)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise EdgekdError(f"{onnx_path} is not a readable ONNX model: {exc}", "re-export it with `edgekd export`") from exc
    inits = {i.name for i in model.graph.initializer}
    inp = next((i for i in model.graph.input if i.name not in inits), None)
    if inp is None:
        raise EdgekdError(f"{onnx_path} has no graph input", "re-export it with `edgekd export`")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def float_layers_in(onnx_path: str | os.PathLike) -> list[str]:
    """The layers edgekd's export stamped as kept in higher precision (metadata ``float_layers``)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return list(json.loads(props.get("float_layers") or "[]"))


# ----------------------------------------------------------------------------- trtexec
def _shape(name: str, dims: list[int]) -> str:
    return f"{name}:" + "x".join(str(d) for d in dims)


def trtexec_commands(target: Mapping[str, Any], onnx_rel: str, input_name: str, input_dims: list[int | None], primary: str) -> dict[str, list[str]]:
    """The exact trtexec command lines (argv) to build and time the engine(s) on the device.

    Shapes come from :mod:`edgekd.runners.shapes`: on the GPU one engine with a 1..batch profile;
    on the DLA (static shapes only) one engine per batch size, ``engine/<primary>.plan`` at the
    target's batch and ``engine/<primary>.b1.plan`` at batch 1, each timed with its own shape."""
    chw = [int(d) for d in input_dims[1:]]
    fixed = None if input_dims[0] is None else int(input_dims[0])
    batch = int(target.get("batch") or 1)
    dla = target.get("dla") or {}
    on_dla = dla.get("core") is not None
    batches = engine_batches([batch, 1], on_dla, fixed)
    precision = trtexec_precision_flags(target.get("precision", "int8"), target.get("tensorrt"), on_dla)
    dla_flags = [f"--useDLACore={dla['core']}"] + (["--allowGPUFallback"] if dla.get("gpu_fallback", True) else []) if on_dla else []
    timing = ["--noDataTransfers", f"--warmUp={DEFAULT_WARMUP_MS}", f"--duration={DEFAULT_DURATION_S}", "--useSpinWait", f"--percentile={PERCENTILES}"]
    if not on_dla:
        timing.insert(0, "--useCudaGraph")  # CUDA graphs cannot capture DLA work
    skip = "--buildOnly" if tensorrt_major(target.get("tensorrt")) < 10 else "--skipInference"  # TensorRT < 10 spells it --buildOnly
    engines = {b: f"engine/{primary}.plan" if b == batches[0] else f"engine/{primary}.b{b}.plan" for b in batches}

    def build(b: int) -> list[str]:
        prof = engine_profile(b, batch, on_dla, fixed)
        shapes = [] if fixed else [f"--{k}Shapes={_shape(input_name, list(s))}" for k, s in zip(("min", "opt", "max"), prof.shapes(chw))]
        return ["trtexec", f"--onnx={onnx_rel}", f"--saveEngine={engines[b]}", *precision, *shapes, *dla_flags,
                "--timingCacheFile=engine/timing.cache", "--profilingVerbosity=detailed", skip]

    def load(b: int) -> list[str]:
        """Time batch ``b``: on its own static engine (DLA, fixed batch), or the dynamic engine at shape ``b``."""
        shapes = [] if fixed or on_dla else [f"--shapes={_shape(input_name, [b, *chw])}"]
        return ["trtexec", f"--loadEngine={engines.get(b, engines[batches[0]])}", *dla_flags[:1], *shapes]

    cmds: dict[str, list[str]] = {"build": build(batches[0])}
    for b in batches[1:]:
        cmds[f"build_batch{b}"] = build(b)
    cmds["bench_batch1"] = [*load(1), *timing]
    if (fixed or batch) != 1:
        cmds["bench_batch"] = [*load(fixed or batch), *timing]
    cmds["profile"] = [*load(fixed or batch), "--noDataTransfers", "--separateProfileRun",
                       "--dumpProfile", "--exportProfile=engine/profile.json", "--exportLayerInfo=engine/layers.json"]
    return cmds


def build_engine_script(cmds: Mapping[str, list[str]], target: Mapping[str, Any], float_layers: list[str] | tuple[str, ...] = ()) -> str:
    """A POSIX sh script that runs the trtexec commands on the device and keeps every log."""
    power = target.get("power") or {}
    lines = [
        "#!/bin/sh",
        "# Build and time the TensorRT engine on this device (written by edgekd; run from the bundle folder).",
        *([f"# {len(float_layers)} layer(s) have no Q/DQ and run in FP16 (--fp16): INT8 cost too much accuracy there "
           "(edgekd's accuracy budget, see report/sensitivity.json):", *(f"#   {name}" for name in float_layers)] if float_layers else []),
        "set -eu",
        'cd "$(dirname "$0")/.."',
        "TRTEXEC=$(command -v trtexec || true)",
        'for p in /usr/src/tensorrt/bin/trtexec /opt/tensorrt/bin/trtexec; do [ -n "$TRTEXEC" ] || { [ -x "$p" ] && TRTEXEC=$p; } || true; done',
        '[ -n "$TRTEXEC" ] || { echo "trtexec not found (JetPack installs it at /usr/src/tensorrt/bin/trtexec)" >&2; exit 3; }',
    ]
    if power:
        lines += [
            f"# Timing assumes nvpmodel mode {power['id']} ({power['name']})" + (" with jetson_clocks" if power.get("jetson_clocks") else "") + ":",
            f"#   sudo nvpmodel -m {power['id']}" + ("  &&  sudo jetson_clocks" if power.get("jetson_clocks") else ""),
            "if command -v nvpmodel >/dev/null 2>&1; then nvpmodel -q > engine/nvpmodel.txt 2>&1 || true; fi",
        ]
    for key in [k for k in cmds if k.startswith("build")] + ["bench_batch1", "bench_batch", "profile"]:
        if key in cmds:
            argv = ['"$TRTEXEC"', *(shlex.quote(a) for a in cmds[key][1:])]
            lines.append(f"{' '.join(argv)} > engine/{key}.log 2>&1 || {{ tail -n 30 engine/{key}.log >&2; exit 4; }}")
    lines.append('echo "engine: engine/$(ls engine | grep .plan$)"')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- README / run.sh
RUN_SH = """#!/bin/sh
# Classify images with this bundle: ./run.sh image.png [more.png ...]   (needs python3, numpy, pillow, onnxruntime)
# Also: ./run.sh selfcheck   |   ./run.sh bench --runs 200
set -eu
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
case "${1:-}" in
  selfcheck|bench) cmd=$1; shift; exec "$PY" -m edgekd.runtime "$cmd" . "$@" ;;
  *) exec "$PY" -m edgekd.runtime predict . "$@" ;;
esac
"""


def readme_text(meta: Mapping[str, Any]) -> str:
    t = meta.get("target") or {}
    m = meta.get("metrics") or {}
    trt = "\n".join(f"    {' '.join(shlex.quote(a) for a in argv)}" for argv in (meta.get("trtexec") or {}).values())
    return f"""# edgekd bundle: {meta['name']}

Target: **{t.get('name', 'none')}** ({t.get('description', '')}); runtime {t.get('runtime', '-')}, precision {t.get('precision', '-')},
Q/DQ layout {t.get('layout', '-')}, batch {t.get('batch', '-')}.
Input: {meta['preprocess']['input_size']}x{meta['preprocess']['input_size']}, {meta['preprocess']['channels']} channel(s), mean {meta['preprocess']['mean']}, std {meta['preprocess']['std']}.
Classes: {len(meta['classes'])} (labels.txt). Measured on the host: {json.dumps(m)}

## On the device (no torch needed)

    pip install numpy pillow onnxruntime       # on a Jetson: JetPack's python3 + tensorrt work too; openvino instead of onnxruntime works too
    sha256sum -c SHA256SUMS                   # every file is checked again when the runtime loads
    ./run.sh selfcheck                        # checksums, load, same top-1 as the host on reference/inputs.npy
    ./run.sh image.png                        # top-5 labels and probabilities
    ./run.sh bench --runs 200                 # latency p50/p90/p99 (records nvpmodel -q / jetson_clocks --show)

## TensorRT engine (built on the device: engines are tied to the GPU and TensorRT version)

    sh engine/build_engine.sh

which runs:

{trt or '    (not a TensorRT target)'}

Time in a fixed power mode: `sudo nvpmodel -m ID && sudo jetson_clocks`, and report trtexec's "GPU Compute Time" percentiles.
{_float_layers_note(meta.get("float_layers") or [])}"""


def _float_layers_note(layers: list[str]) -> str:
    if not layers:
        return ""
    return f"""
## Layers kept in higher precision

{len(layers)} layer(s) have no Q/DQ and run in FP16 on TensorRT, in float on onnxruntime, because INT8 cost too much
accuracy there (edgekd's accuracy budget; report/sensitivity.json ranks every layer): {', '.join(layers)}.
onnxruntime >= 1.20 would quantize them per-tensor at session start; this bundle's runtime prevents that, and your own
sessions should too: `ort.InferenceSession(path, disabled_optimizers=["WeightBiasQuantization"])`.
"""
