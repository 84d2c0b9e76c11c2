"""The bundle's deterministic ``.tar.gz`` (fixed order, times and owners: the same bundle gives
the same bytes) and reading a bundle's metadata back."""


from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Any

from edgekd import runtime as rt
from edgekd.errors import EdgekdError
from edgekd.atomic import atomic_path

EXECUTABLE = {"run.sh", "engine/build_engine.sh"}


# ----------------------------------------------------------------------------- tar
def _tarinfo(rel: str, size: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if size is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = size
        info.mode = 0o755 if rel.split("/", 1)[-1] in EXECUTABLE else 0o644
    return info


def tar_bytes(bundle_dir: str | os.PathLike) -> bytes:
    """A reproducible .tar.gz of the folder: sorted entries, zero mtimes/owners, fixed modes."""
    root = Path(bundle_dir)
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(root.name, None))
            for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
                rel = f"{root.name}/{p.relative_to(root).as_posix()}"
                if p.is_symlink():
                    raise EdgekdError(f"bundle contains a symlink {p}", "bundles hold plain files only")
                if p.is_dir():
                    tar.addfile(_tarinfo(rel, None))
                else:
                    data = p.read_bytes()
                    tar.addfile(_tarinfo(rel, len(data)), io.BytesIO(data))
    return raw.getvalue()


def tar_bundle(bundle_dir: str | os.PathLike, tar_path: str | os.PathLike | None = None) -> Path:
    """Write ``<bundle_dir>.tar.gz`` (or ``tar_path``) atomically."""
    root = Path(bundle_dir)
    dest = Path(tar_path) if tar_path else root.with_name(root.name + ".tar.gz")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(tar_bytes(root))
        os.chmod(tmp, 0o644)
    return dest


def load_bundle_meta(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Open (folder or .tar.gz, safely extracted) and verify a bundle; returns its root and bundle.json."""
    root = rt.open_bundle(path)
    return root, rt.verify_bundle(root)
