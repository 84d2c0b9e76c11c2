"""The classifier: a verified bundle, its preprocessing and the best backend, behind one object.

Opening a bundle (folder or .tar.gz) always verifies it first, so nothing the device runs can
differ from what the host built and measured.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.runtime.backends import OrtModel, OvModel, TrtModel, openvino_usable, tensorrt_usable
from edgekd.runtime.integrity import open_bundle, verify_bundle
from edgekd.runtime.preprocessing import load_image, preprocess, softmax

ENGINE_DIR = "engine"
BACKENDS = ("auto", "ort", "openvino", "tensorrt")


class Classifier:
    """A verified bundle ready to classify images.

    >>> clf = Classifier("bundle.tar.gz")                     # doctest: +SKIP
    >>> clf.classify_files(["shoe.png"], top_k=3)              # doctest: +SKIP
    [[('Sneaker', 0.91), ('Sandal', 0.05), ('Ankle boot', 0.03)]]
    """

    def __init__(self, bundle: str | os.PathLike, backend: str = "auto", threads: int | None = None, workdir: str | os.PathLike | None = None):
        self.root = open_bundle(bundle, workdir)
        if workdir is None and not Path(bundle).is_dir():
            weakref.finalize(self, shutil.rmtree, self.root.parent if self.root.parent.name.startswith("edgekd-bundle-") else self.root, True)
        self.meta = verify_bundle(self.root)
        self.classes: list[str] = list(self.meta["classes"])
        self.pre: dict[str, Any] = self.meta["preprocess"]
        self.target: dict[str, Any] = self.meta.get("target") or {}
        self.model_file = self.root / self.meta["models"][self.meta["primary"]]
        self.engine_file = self.root / ENGINE_DIR / f"{self.meta['primary']}.plan"
        self.fallback_reason: str | None = None
        self.model = self._backend(backend, threads or self.target.get("threads"))

    def _backend(self, backend: str, threads: int | None) -> OrtModel | OvModel | TrtModel:
        if backend not in BACKENDS:
            raise EdgekdError(f"unknown backend '{backend}'", f"use {', '.join(BACKENDS)}")
        if backend in ("auto", "tensorrt"):
            why = tensorrt_usable() or (None if self.engine_file.is_file() else f"no engine at {self.engine_file.relative_to(self.root)} (run engine/build_engine.sh)")
            if why is None:
                return TrtModel(self.engine_file)
            if backend == "tensorrt":
                raise EdgekdError(f"cannot use TensorRT: {why}", "build the engine on the device or use --backend ort")
            self.fallback_reason = why if self.target.get("runtime") == "tensorrt" else None
        if backend == "openvino" or (backend == "auto" and self._prefers_openvino()):
            return OvModel(self.model_file, threads=threads, device=self.target.get("openvino_device") or "CPU")
        return OrtModel(self.model_file, threads=threads, cuda=self.target.get("runtime") == "ort-cuda")

    def _prefers_openvino(self) -> bool:
        """'auto': OpenVINO where the target is an OpenVINO one, or where it is the only runtime installed."""
        if openvino_usable() is not None:
            if self.target.get("runtime") == "openvino":
                self.fallback_reason = "OpenVINO is not installed (pip install openvino): running on onnxruntime"
            return False
        return self.target.get("runtime") == "openvino" or importlib.util.find_spec("onnxruntime") is None

    @property
    def backend(self) -> str:
        return self.model.name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed float32 (N, C, S, S) -> logits (N, classes)."""
        return np.asarray(self.model.run(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)

    def predict_u8(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> class probabilities (N, classes)."""
        return softmax(self.logits(preprocess(images_u8, self.pre)))

    def classify(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """uint8 (C, H, W) images of any size -> top-k (label, probability) per image."""
        probs = np.concatenate([self.predict_u8(img[None]) for img in images]) if images else np.zeros((0, len(self.classes)))
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            out.append([(self.classes[i], float(p[i])) for i in order])
        return out

    def classify_files(self, paths: Iterable[str | os.PathLike], top_k: int = 5) -> list[list[tuple[str, float]]]:
        return self.classify([load_image(p, self.pre) for p in paths], top_k)
