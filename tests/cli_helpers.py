"""Run `edgekd` the way users and CI do: the real console script in a subprocess (``run_cli``), or
the same entry point in this process for error checks (``run_inprocess``: no Python + torch start-up)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

EDGEKD = str(Path(sys.executable).parent / "edgekd")


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "EDGEKD_QUIET": "1", **(env or {})}
    return subprocess.run([EDGEKD, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def json_out(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str, after: tuple[str, ...] = ()) -> None:
    """Exit code 2 and stderr is exactly one line, ``error: ...``, that names the problem (``needle``).

    ``after`` lists the starts of lines a test expects before the error (an information line the
    command prints on purpose); any other earlier line, a wrapped error or a traceback fails."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert needle in lines[-1], (needle, lines[-1])
    unexpected = [line for line in lines[:-1] if not line.startswith(after or ("\0",))]
    assert unexpected == [], proc.stderr[-2000:]


def run_inprocess(*args: str) -> subprocess.CompletedProcess:
    """``edgekd ARGS`` through the real entry point (edgekd.cli.main), in this process: the same
    error handling as the console script without paying Python + torch start-up for every case."""
    from edgekd import cli, ui

    out, err = io.StringIO(), io.StringIO()
    argv, quiet_env, quiet = sys.argv, os.environ.get("EDGEKD_QUIET"), ui.is_quiet()
    sys.argv = ["edgekd", *map(str, args)]
    os.environ["EDGEKD_QUIET"] = "1"  # as run_cli: no tables or progress, only what the command prints itself
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        if quiet_env is None:
            os.environ.pop("EDGEKD_QUIET", None)
        else:
            os.environ["EDGEKD_QUIET"] = quiet_env
        ui.set_quiet(quiet)
    return subprocess.CompletedProcess(["edgekd", *args], code, out.getvalue(), err.getvalue())


# A real build shrunk to seconds: pico CNN teacher and student at 28 px on a real Fashion-MNIST subset.
TINY_BUILD = {
    "teacher.model": "pico_cnn", "teacher.pretrained": "none", "teacher.input_size": 28, "teacher.train.epochs": 2, "teacher.train.lr": 0.003,
    "student.model": "pico_cnn", "student.train.epochs": 2, "data.train_subset": 1500, "data.test_subset": 500,
    "quantize.train.epochs": 1, "quantize.calib_images": 128, "bench.runs": 20, "bench.warmup": 2, "bench.batches": "[1,8]", "export.check_batch": 128,
}


def tiny_build(changes: dict | None = None) -> list[str]:
    """``--set`` arguments of :data:`TINY_BUILD` with ``changes`` on top (a value of None drops the key,
    so the recipe's default applies): one place for what "a tiny build" means in every test."""
    merged = {**TINY_BUILD, **(changes or {})}
    return [arg for key, value in merged.items() if value is not None for arg in ("--set", f"{key}={value}")]
