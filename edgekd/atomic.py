"""Files written whole or not at all, and their checksums: the I/O every edgekd artifact goes through.

Every file edgekd produces is written to a temporary sibling and renamed into place, so an
interrupted run (Ctrl-C, SIGKILL, a full disk) never leaves a half-written artifact under its
final name. Torch-free and stdlib-only: it ships in every bundle beside ``edgekd/runtime/``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgekd.errors import EdgekdError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.
    Under torchrun only rank 0 writes artifacts (``edgekd.train.env.on_main``): a write on another
    rank is a bug, refused here before two ranks race on one file."""
    if os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"rank {os.environ['RANK']} tried to write {path}: under torchrun only rank 0 writes artifacts")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; artifacts get the mode any other new file would
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except Exception as exc:
        full = out_of_space(exc, final.parent, tmp)  # before the unlink frees the space again
        tmp.unlink(missing_ok=True)
        if full:
            raise EdgekdError(f"disk full (or file size limit reached) while writing {final}", "free some space and rerun; nothing was left half-written") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TEMP_GLOB = ".*.tmp"  # what atomic_path names its temporary siblings


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed process left behind (SIGKILL skips atomic_path's cleanup).
    Call only while holding the run folder's lock, so no live writer owns them."""
    stale = sorted(Path(run_dir).rglob(TEMP_GLOB))
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)  # a bundle being assembled
        else:
            p.unlink(missing_ok=True)
    return stale


def _at_file_size_limit(path: Path) -> bool:
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return limit != resource.RLIM_INFINITY and path.stat().st_size >= limit
    except (ImportError, OSError, ValueError):
        return False


NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def out_of_space(exc: BaseException, folder: Path, written: Path | None = None) -> bool:
    """Whether a failed write ran out of room. torch.save and onnx wrap ENOSPC/EFBIG in a RuntimeError
    without the errno, so the file system's free space (and the process's file-size limit) is the
    fallback evidence."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    if written is not None and _at_file_size_limit(written):
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise EdgekdError(f"{what} not found: {p}", "check the path")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekdError(f"{what} {p} is not valid JSON: {exc}", "delete it or restore it from a good copy") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys), used as a config fingerprint."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
