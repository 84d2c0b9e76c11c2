"""The on-device runtime for edgekd bundles: numpy + Pillow + onnxruntime (or TensorRT), never torch.

Installing torch-based tools on a Jetson can replace JetPack's own torch build, so the device side
needs only ``python3``, ``numpy``, ``pillow`` and ``onnxruntime`` (or ``openvino``, or JetPack's ``tensorrt``).
This package is copied into every bundle (with ``edgekd/__init__.py``, ``errors.py`` and
``atomic.py``, all torch-free) and runs from the bundle folder::

    python3 -m edgekd.runtime BUNDLE image.png ... [--top-k 5] [--json]
    python3 -m edgekd.runtime selfcheck BUNDLE [--json]     # checksums, load, reference outputs
    python3 -m edgekd.runtime bench BUNDLE --runs 200 [--batch 1 --batch 8] [--json]

integrity.py (checksums, safe tar), preprocessing.py (numpy twin of ``edgekd.data.Preprocess``),
backends.py (onnxruntime, OpenVINO, TensorRT), classifier.py, checks.py (selfcheck, latency), cli.py.
It must keep running on Python 3.8 (JetPack 5).
"""

from __future__ import annotations

from edgekd.atomic import sha256_file
from edgekd.runtime.integrity import (BUNDLE_FORMAT, BUNDLE_JSON, BUNDLE_VERSION, REFERENCE_INPUTS, SUMS_NAME, bundle_root, member_problem, meta_problem,
                                      open_bundle, read_sums, safe_extract, safe_relpath, verify_bundle)
from edgekd.runtime.preprocessing import GREY_WEIGHTS, load_image, map_channels, preprocess, resize_bilinear, softmax
from edgekd.runtime.backends import OrtModel, OvModel, TrtModel, openvino_usable, tensorrt_usable
from edgekd.runtime.classifier import ENGINE_DIR, Classifier
from edgekd.runtime.checks import JETSON_TOOLS, bench, check_reference, device_info, latency_ms, selfcheck
from edgekd.runtime.cli import main

__all__ = [
    "BUNDLE_FORMAT", "BUNDLE_JSON", "BUNDLE_VERSION", "ENGINE_DIR", "GREY_WEIGHTS", "JETSON_TOOLS", "REFERENCE_INPUTS", "SUMS_NAME",
    "Classifier", "OrtModel", "OvModel", "TrtModel", "bench", "bundle_root", "check_reference", "device_info", "latency_ms", "load_image", "main",
    "map_channels", "member_problem", "meta_problem", "open_bundle", "preprocess", "read_sums", "resize_bilinear", "safe_extract",
    "safe_relpath", "selfcheck", "sha256_file", "softmax", "openvino_usable", "tensorrt_usable", "verify_bundle",
]
