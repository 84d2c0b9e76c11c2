"""Bundle integrity: the bundle's file names, ``SHA256SUMS`` checks and safe tar extraction.

A device must never run a bundle that changed after the host built it, nor let a crafted archive
write outside its folder. So every listed file's sha256 is checked (``SHA256SUMS``, also checkable
with ``sha256sum -c``) before anything is loaded, ``bundle.json`` is checked for what the classifier
relies on (one clear line on the device instead of a traceback), and tar members are vetted before
a single byte is extracted.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from edgekd.errors import EdgekdError
from edgekd.atomic import sha256_file  # torch-free; shipped in the bundle beside this package

BUNDLE_FORMAT = "edgekd-bundle"
BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"
SUMS_NAME = "SHA256SUMS"
REFERENCE_INPUTS = "reference/inputs.npy"


# ----------------------------------------------------------------------------- checksums
def safe_relpath(rel: str) -> PurePosixPath:
    """A bundle-relative path that cannot leave the bundle (no absolute path, no '..')."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or rel.startswith("\\"):
        raise EdgekdError(f"bundle lists an unsafe path '{rel}'", "the bundle was tampered with; rebuild it on the host")
    return p


def read_sums(root: Path) -> dict[str, str]:
    """Parse ``SHA256SUMS`` (``sha256sum`` format: '<hex>  <path>')."""
    path = root / SUMS_NAME
    if not path.is_file():
        raise EdgekdError(f"{root} is not an edgekd bundle: {SUMS_NAME} missing", "pass the folder or .tar.gz written by make_bundle / edgekd build")
    sums: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgekdError(f"{path} is not a text file", "the bundle was tampered with; rebuild it on the host") from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise EdgekdError(f"{path}:{n} is not a '<sha256>  <path>' line", "the bundle was tampered with; rebuild it on the host")
        sums[str(safe_relpath(rel))] = digest
    return sums


def verify_bundle(root: str | os.PathLike) -> dict[str, Any]:
    """Check every listed file's sha256, then return ``bundle.json``. Anything changed is refused."""
    root = Path(root)
    sums = read_sums(root)
    if BUNDLE_JSON not in sums:
        raise EdgekdError(f"{root / SUMS_NAME} does not cover {BUNDLE_JSON}", "the bundle was tampered with; rebuild it on the host")
    for rel, digest in sums.items():
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise EdgekdError(f"bundle file {rel} is missing (or not a plain file) in {root}", "copy the whole bundle again")
        if sha256_file(path) != digest:
            raise EdgekdError(f"bundle file {rel} was modified: sha256 does not match {SUMS_NAME}", "refusing to run it; copy the bundle again from the host")
    try:
        meta = json.loads((root / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgekdError(f"{root / BUNDLE_JSON} is not valid JSON", "rebuild the bundle on the host") from exc
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT or meta.get("version") != BUNDLE_VERSION:
        got = f"{meta.get('format')} v{meta.get('version')}" if isinstance(meta, dict) else type(meta).__name__
        raise EdgekdError(f"{root} is bundle format {got}, this runtime reads {BUNDLE_FORMAT} v{BUNDLE_VERSION}", "use the runtime shipped inside the bundle")
    problem = meta_problem(meta, sums)
    if problem:
        raise EdgekdError(f"{root / BUNDLE_JSON}: {problem}", "the bundle was tampered with; rebuild it on the host")
    return meta


def meta_problem(meta: dict[str, Any], sums: dict[str, str]) -> str | None:
    """What a Classifier would trip on in ``bundle.json`` (checked here so the device gets one clear line)."""
    files = meta.get("files", {})
    if not isinstance(files, dict):
        return "'files' is not a mapping"
    unlisted = [rel for rel in files if rel not in sums]
    if unlisted:
        return f"files {unlisted} have no checksum in {SUMS_NAME}"
    classes, pre, models = meta.get("classes"), meta.get("preprocess"), meta.get("models")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of class names"
    if not isinstance(pre, dict) or not {"input_size", "channels", "mean", "std"} <= set(pre):
        return "'preprocess' lacks input_size, channels, mean or std"
    numbers = [pre["input_size"], pre["channels"], *(pre["mean"] if isinstance(pre["mean"], list) else [None]), *(pre["std"] if isinstance(pre["std"], list) else [None])]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or pre["input_size"] < 1 or pre["channels"] not in (1, 3) \
            or len(pre["mean"]) != pre["channels"] or len(pre["std"]) != pre["channels"] or not all(s > 0 for s in pre["std"]):
        return "'preprocess' values are not a valid input size, channel count, mean and std"
    primary = meta.get("primary")
    if not isinstance(models, dict) or not isinstance(primary, str) or primary not in models or not isinstance(models[primary], str):
        return "'models' does not name the primary model's file"
    try:
        safe_relpath(models[meta["primary"]])
    except EdgekdError as exc:
        return exc.message
    if not isinstance(meta.get("target", {}) or {}, dict):
        return "'target' is not a mapping"
    return None


# ----------------------------------------------------------------------------- safe tar extraction
def member_problem(member: tarfile.TarInfo, dest: Path) -> str | None:
    """Why extracting ``member`` under ``dest`` would be unsafe, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts or ".." in name.replace("\\", "/").split("/"):
        return "path with '..'"
    if member.issym() or member.islnk():
        return "link"
    if not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        return "path outside the destination"
    return None


def safe_extract(tar_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a bundle tar into ``dest``, refusing absolute paths, '..', links and special files.

    Every member is checked before anything is written, and Python's ``data`` filter
    (PEP 706) is applied on top where this Python has it.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                problem = member_problem(m, dest)
                if problem:
                    raise EdgekdError(f"refusing to extract {tar_path}: member '{m.name}' is a {problem}", "this archive is not a bundle written by edgekd; do not use it")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python < 3.11.4: our own checks above are the filter
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # zlib.error: a corrupted .gz stream (found by tests/test_fuzz.py)
        if isinstance(exc, tarfile.FilterError if hasattr(tarfile, "FilterError") else ()):
            raise EdgekdError(f"refusing to extract {tar_path}: {exc}", "this archive is not a bundle written by edgekd") from exc
        raise EdgekdError(f"cannot read bundle archive {tar_path}: {exc}", "copy it again; the file may be truncated") from exc
    return dest


def bundle_root(folder: Path) -> Path:
    """The folder holding SHA256SUMS: ``folder`` itself or its single top-level directory."""
    if (folder / SUMS_NAME).is_file():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / SUMS_NAME).is_file():
        return subdirs[0]
    raise EdgekdError(f"{folder} holds no edgekd bundle ({SUMS_NAME} not found)", "pass the bundle folder or its .tar.gz")


def open_bundle(path: str | os.PathLike, workdir: str | os.PathLike | None = None) -> Path:
    """A bundle folder, or a .tar.gz safely extracted into ``workdir`` (default: a temp folder)."""
    p = Path(path)
    if p.is_dir():
        return bundle_root(p)
    if not p.is_file():
        raise EdgekdError(f"bundle not found: {p}", "pass the bundle folder or its .tar.gz")
    dest = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgekd-bundle-"))
    return bundle_root(safe_extract(p, dest))
