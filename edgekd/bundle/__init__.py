"""Deployment bundles: everything a device needs to run (and re-check) the model, in one folder.

A bundle is a folder plus a deterministic ``.tar.gz`` of it::

    bundle/
      bundle.json          name, models, classes, preprocessing, resolved target, measured
                           metrics, trtexec commands, reference outputs, sha256 of every file
      SHA256SUMS           sha256 of every file incl. bundle.json (``sha256sum -c SHA256SUMS``)
      labels.txt           one class per line
      model/NAME.onnx      the INT8 (or FP16/FP32) ONNX model(s)
      reference/inputs.npy images the host ran; the device must give the same top-1 (selfcheck)
      engine/build_engine.sh  TensorRT targets: the exact trtexec build + timing commands
      edgekd/runtime/      the torch-free runtime package (+ edgekd/__init__.py, errors.py, atomic.py)
      run.sh, README.md

The trtexec flags follow NVIDIA's TensorRT "Best Practices" guide and the Jetson benchmarking
norms: explicit Q/DQ needs ``--int8`` (``--fp16`` lets non-quantized layers run in half), dynamic
batch via ``--min/opt/maxShapes``, ``--useDLACore`` + ``--allowGPUFallback`` for the DLA, a timing
cache, ``--useCudaGraph --noDataTransfers`` with warm-up and a fixed duration for timing, and
``--separateProfileRun --dumpProfile`` for per-layer profiles. The bundle is written atomically
(built in a temp folder, renamed into place); extraction goes through
:func:`edgekd.runtime.safe_extract`.

>>> make_bundle("runs/x/bundle", BundleModel({"student_int8": "runs/x/student_int8.onnx"}, "student_int8",
...             classes, model.preprocess), get_target("jetson"), {"test_top1": 0.90})  # doctest: +SKIP
PosixPath('runs/x/bundle')

Modules: ``make`` (make_bundle), ``scripts`` (trtexec commands, build_engine.sh, run.sh, README),
``archive`` (the deterministic tar, reading a bundle back).
"""

from edgekd.bundle.archive import load_bundle_meta, tar_bundle, tar_bytes
from edgekd.bundle.make import RUNTIME_FILES, BundleModel, make_bundle, reference_images
from edgekd.bundle.scripts import build_engine_script, onnx_input, readme_text, trtexec_commands

__all__ = ["RUNTIME_FILES", "BundleModel", "build_engine_script", "load_bundle_meta", "make_bundle", "onnx_input", "readme_text", "reference_images",
           "tar_bundle", "tar_bytes", "trtexec_commands"]
