"""The ``edgekd`` command line: wiring only. Each command validates its options through the typed
recipe (edgekd/config.py) and calls one stage function; errors become one line and exit code 2."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.errors import EdgekdError

app = typer.Typer(
    name="edgekd",
    help="Big accurate classifier -> small INT8 model that runs fast on an edge device.\n\n"
    "Stages: finetune (teacher) -> distill (student) -> quantize (QAD) -> export (INT8 ONNX / TensorRT) -> bench. "
    "`edgekd build --target NAME` runs them all in the order teacher, control (the student alone), distill, qad, "
    "export, evaluate, bench, report, bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STATE = {"debug": False, "rank": 0, "world": 1}


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", envvar="EDGEKD_QUIET", help="No progress bars or tables (also EDGEKD_QUIET=1).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for training/inference (torch). On a shared or busy machine 1 is often faster than 2+: OpenMP threads spin while waiting for a core. \\[default: torch's, or $OMP_NUM_THREADS]")] = None,
) -> None:
    STATE["debug"] = debug
    ui.set_debug(debug)
    ui.set_quiet(quiet)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        join_ranks()


def join_ranks() -> None:
    """Under torchrun: join the process group before anything can fail (so a failure reaches the
    other ranks), print only on rank 0, and turn torchrun's SIGTERM (sent when another rank failed)
    into :class:`RankStopped`."""
    from edgekd.train.env import init_distributed  # torch is imported only under torchrun: `edgekd --help` stays fast

    env = init_distributed()
    STATE["rank"], STATE["world"] = env.rank, env.world
    if not env.is_main:
        ui.set_quiet(True, warnings=False)

    def stopped(signum, frame):  # noqa: ARG001
        raise RankStopped()

    signal.signal(signal.SIGTERM, stopped)


class RankStopped(BaseException):
    """torchrun stopped this rank (SIGTERM), as it does when another rank has failed."""


# Each stage's commands live in edgekd/commands/<stage>.py and register themselves here, in --help's order.
from edgekd.commands import (bench as _bench_cmds, build as _build_cmds, deploy as _deploy_cmds, distill as _distill_cmds,  # noqa: E402
                             export as _export_cmds, finetune as _finetune_cmds, models as _models_cmds, quantize as _quantize_cmds,
                             targets as _targets_cmds)

for _mod in (_finetune_cmds, _models_cmds, _distill_cmds, _quantize_cmds, _export_cmds, _bench_cmds, _build_cmds, _targets_cmds, _deploy_cmds):
    _mod.register(app)


def _is_usage_error(exc: BaseException) -> bool:
    """A bad command line (unknown option, missing argument, value of the wrong type or out of range)."""
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _usage_line(exc: BaseException) -> str:
    """Click's message and the command's --help, on one line (Click itself prints a usage block)."""
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None) or "edgekd"
    return f"{' '.join(exc.format_message().split()).rstrip('.')} (see `{where} --help`)"


def main() -> None:
    """Console entry point: one-line errors, exit code 2, tracebacks only with --debug."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on every CPU run (modelopt import)
    try:
        try:
            code = app(standalone_mode=False)
            if STATE["world"] > 1:
                from edgekd.train.env import leave_distributed  # only under torchrun

                leave_distributed()
        except BaseException as exc:  # noqa: BLE001 - under torchrun every failure becomes one line on every rank
            if STATE["world"] > 1 and not STATE["debug"] and not isinstance(exc, (SystemExit, KeyboardInterrupt)) and not _is_exit(exc):
                _rank_failure(exc)
            raise
        # Typer turns Ctrl-C into Exit(130) and, outside standalone mode, *returns* exit codes.
        if isinstance(code, int) and code != 0:
            if code == 130:
                ui.console.print("[bold red]interrupted[/]: rerun the same command to resume", soft_wrap=True)
            sys.exit(code)
    except EdgekdError as exc:
        if STATE["debug"]:
            raise
        ui.error(exc.one_line())
        sys.exit(2)
    except KeyboardInterrupt:
        ui.console.print("[bold red]interrupted[/]: rerun the same command to resume", soft_wrap=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, typer.Exit) or type(exc).__name__ == "Exit":
            sys.exit(getattr(exc, "exit_code", 0))
        if isinstance(exc, typer.Abort) or type(exc).__name__ == "Abort":
            ui.console.print("[bold red]interrupted[/]: rerun the same command to resume", soft_wrap=True)
            sys.exit(130)
        if _is_usage_error(exc):  # Typer >= 0.26 vendors Click, so its exceptions are not click's classes
            ui.error(_usage_line(exc))
            sys.exit(2)
        if STATE["debug"]:
            raise
        ui.error(f"{_unexpected(exc)} (rerun with --debug for the traceback and report it)")
        sys.exit(1)


def _unexpected(exc: BaseException) -> str:
    return f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _rank_failure(exc: BaseException) -> None:
    """One line on this rank, then exit 1: either this rank's own failure (left in torchrun's store
    for the others), or, when another rank failed first and took this one down with it (torchrun's
    SIGTERM, a broken collective), which rank failed and its line."""
    from edgekd.train.env import announce_failure, peer_failure  # only under torchrun

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the line is being written; torchrun's SIGTERM must not cut it
    me = f"rank {STATE['rank']} of {STATE['world']}"
    knock_on = isinstance(exc, RankStopped) or _is_collective_error(exc)
    peer = peer_failure(wait_s=3.0 if knock_on else 0.0)
    if peer is not None:
        ui.error(f"{me} stopped: rank {peer[0]} failed: {peer[1]}")
    elif isinstance(exc, EdgekdError):
        announce_failure(exc.one_line())
        ui.error(f"{me}: {exc.one_line()}")
    elif knock_on:
        ui.error(f"{me} stopped: {_unexpected(exc) if not isinstance(exc, RankStopped) else 'torchrun stopped it'} "
                 "(another rank failed or was stopped: see the first error line above and torchrun's summary)")
    else:
        announce_failure(f"{_unexpected(exc)} (rerun with --debug for the traceback and report it)")
        ui.error(f"{me}: {_unexpected(exc)} (rerun with --debug for the traceback and report it)")
    # Leave at once: the process group cannot be destroyed cleanly with a rank gone (torchtitan#1342), and
    # left to the interpreter's shutdown, gloo's threads abort the process (pytorch#190489): exit code 1, not SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _is_exit(exc: BaseException) -> bool:
    """Typer's Exit/Abort and a bad command line: handled the same on every rank, not a rank's failure."""
    return type(exc).__name__ in ("Exit", "Abort") or _is_usage_error(exc)


def _is_collective_error(exc: BaseException) -> bool:
    """A collective call failed: what a rank sees when another rank died in the middle of one."""
    text = str(exc)
    return type(exc).__name__.startswith("Dist") or any(k in text for k in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "pair.cc"))


if __name__ == "__main__":
    main()
