"""The run folder: its lock, and ``manifest.json`` (for each stage its status, config hash,
inputs, artifacts with their sha256, metrics and timing), which the pipeline reads to skip or
resume a stage. Files are written through :mod:`edgekd.atomic`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from edgekd.atomic import read_json, remove_stale_temps, sha256_file, write_json_atomic
from edgekd.errors import EdgekdError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a run folder for the length of a build. The kernel drops it when the
    process dies (even by SIGKILL), so a killed build never blocks the next one, while two builds
    writing into the same folder at once are refused."""
    import fcntl

    path = Path(run_dir) / ".edgekd.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgekdError(f"another edgekd run is writing into {run_dir}", "wait for it to finish, or use another --out folder") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike) -> Iterator[list[Path]]:
    """What every command that writes a run folder does first: take its lock, then remove the
    temporary files a killed run left there (safe only under the lock). Yields what was removed."""
    with run_lock(run_dir):
        yield remove_stale_temps(run_dir)


# The distributions each library ships as (GPU builds and CUDA-specific wheels have other names).
_DISTRIBUTIONS = {"edgekd": ("edgekd",), "torch": ("torch",), "timm": ("timm",), "onnx": ("onnx",),
                  "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"), "modelopt": ("nvidia-modelopt",),
                  "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-libs")}


def versions() -> dict[str, str]:
    """Versions of the libraries that decide numerical results, recorded with every artifact.

    A library this process has imported reports its own ``__version__``; the others are read from
    their installed metadata, not imported: importing modelopt, timm and TensorRT only to read a
    version took seconds in every ``edgekd`` process that writes a manifest."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for mod, dists in _DISTRIBUTIONS.items():
        if mod in sys.modules:
            out[mod] = str(getattr(sys.modules[mod], "__version__", "unknown"))
            continue
        for dist in dists:
            try:
                out[mod] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:  # absent optional deps are simply not listed
                continue
    return out


def manifest_shape_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's structure (hand-edited or corrupted), or None.

    Artifact paths must stay inside the run directory: a manifest is never a way to make edgekd
    read or trust a file elsewhere.
    """
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return "'stages' is not a mapping"
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            return f"stage '{name}' is not a mapping"
        arts = entry.get("artifacts", {})
        if not isinstance(arts, dict):
            return f"stage '{name}': 'artifacts' is not a mapping"
        for key, art in arts.items():
            if not isinstance(art, dict) or not isinstance(art.get("path"), str) or not isinstance(art.get("sha256"), str):
                return f"artifact {name}.{key} needs a 'path' and a 'sha256'"
            rel = Path(art["path"])
            if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\x00" in art["path"]:
                return f"artifact {name}.{key} points outside the run directory ({art['path']!r})"
    return None


class Manifest:
    """The run directory's ``manifest.json``: one entry per stage, written atomically after each change."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST_NAME
        if self.path.exists():
            data = read_json(self.path, "run manifest")
            if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION:
                raise EdgekdError(f"{self.path} is not an edgekd v{MANIFEST_VERSION} manifest", "use a fresh --out directory")
            problem = manifest_shape_problem(data)
            if problem:
                raise EdgekdError(f"{self.path} is damaged: {problem}", "delete it (the stages will rerun) or use a fresh --out directory")
            self.data = data
        else:
            self.data = {"manifest_version": MANIFEST_VERSION, "created": time.time(), "versions": versions(), "stages": {}}

    # -- stages -----------------------------------------------------------------------------
    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def is_done(self, name: str, config_hash: str) -> bool:
        """A stage is done when it finished with the same config and its artifacts are intact."""
        entry = self.stage(name)
        if not entry or entry.get("status") != "done" or entry.get("config_hash") != config_hash:
            return False
        return all(self._artifact_ok(a) for a in entry.get("artifacts", {}).values())

    def _artifact_ok(self, art: dict[str, Any]) -> bool:
        p = self.run_dir / art["path"]
        return p.is_file() and sha256_file(p) == art["sha256"]

    def start(self, name: str, config_hash: str) -> None:
        self.data["stages"][name] = {"status": "running", "config_hash": config_hash, "started": time.time()}
        self.save()

    def finish(self, name: str, artifacts: dict[str, str | os.PathLike], metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        entry = self.data["stages"][name]
        entry["artifacts"] = {key: self.artifact(p) for key, p in artifacts.items()}
        entry["metrics"] = metrics or {}
        entry["status"] = "done"
        entry["seconds"] = round(time.time() - entry["started"], 2)
        self.save()
        return entry

    def artifact(self, path: str | os.PathLike) -> dict[str, Any]:
        p = Path(path)
        rel = p.resolve().relative_to(self.run_dir.resolve()) if p.is_absolute() else p
        full = self.run_dir / rel
        return {"path": str(rel), "sha256": sha256_file(full), "bytes": full.stat().st_size}

    def artifact_path(self, stage: str, key: str) -> Path:
        entry = self.stage(stage)
        if not entry or key not in entry.get("artifacts", {}):
            raise EdgekdError(f"stage '{stage}' has no artifact '{key}' in {self.path}", "run the earlier stages first")
        return self.run_dir / entry["artifacts"][key]["path"]

    def verify(self) -> list[str]:
        """Return a list of problems (missing file, checksum mismatch); empty means intact."""
        problems = []
        for name, entry in self.data["stages"].items():
            for key, art in entry.get("artifacts", {}).items():
                p = self.run_dir / art["path"]
                if not p.is_file():
                    problems.append(f"{name}.{key}: missing {art['path']}")
                elif sha256_file(p) != art["sha256"]:
                    problems.append(f"{name}.{key}: checksum mismatch for {art['path']}")
        return problems

    def save(self) -> None:
        self.data["updated"] = time.time()
        write_json_atomic(self.path, self.data)
