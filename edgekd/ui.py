"""Console output: progress bars and tables go to stderr, so ``--json`` keeps stdout clean."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from typing import Any, Iterable

from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)
_QUIET = {"on": os.environ.get("EDGEKD_QUIET") == "1", "warnings": True}
_DEBUG = {"on": os.environ.get("EDGEKD_DEBUG") == "1"}


def set_quiet(quiet: bool, warnings: bool = True) -> None:
    """``warnings=False`` silences warnings too (the ranks other than 0 under torchrun: rank 0 says it once)."""
    _QUIET["on"] = quiet
    _QUIET["warnings"] = warnings


def is_quiet() -> bool:
    return _QUIET["on"]


def set_debug(debug: bool) -> None:
    _DEBUG["on"] = debug


@contextlib.contextmanager
def quiet_library_output():
    """Swallow what libraries print to stdout (modelopt's "Inserted N quantizers") unless --debug:
    it is noise to the user and would break ``--json`` on stdout."""
    if _DEBUG["on"]:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


_ACTIVITY: dict[str, Any] = {"status": "", "printed": time.time()}
HEARTBEAT_S = float(os.environ.get("EDGEKD_HEARTBEAT_S", "25"))  # a non-interactive log gets a line at least this often (plus the poll: under 30 s)


def _print(msg: str, prefix: str = "") -> None:
    """``prefix + msg`` as rich markup (edgekd's own [bold]/[dim]); where text from a library or a
    path in ``msg`` is not valid markup (gloo's ``[/__w/pytorch/.../pair.cc:561]`` reads as a closing
    tag), ``msg`` is printed as text."""
    try:
        console.print(prefix + msg, soft_wrap=True)
    except MarkupError:
        console.print(prefix + escape(msg), soft_wrap=True)
    _ACTIVITY["printed"] = time.time()


def log(msg: str) -> None:
    if not is_quiet():
        _print(msg)


def warn(msg: str) -> None:
    """Warnings are shown even when quiet: a slower or less accurate INT8 model must be loud. One
    line, never wrapped by us: a path cut in two cannot be found with grep or copied from a CI log."""
    if _QUIET["warnings"]:
        _print(msg, "[bold yellow]WARNING[/]: ")


def error(text: str) -> None:
    """``error: <text>``, the text printed as text (an error message is never markup), on one line."""
    console.print(f"[bold red]error[/]: {escape(text)}", soft_wrap=True)


class _Progress(Progress):
    """rich's progress bar, which also remembers the latest status for :func:`heartbeat`: a CI log
    (no TTY) shows no live bar, so the heartbeat prints that status as a plain line."""

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        task = self._tasks.get(task_id)
        if task is not None and task.total:
            fields = " ".join(str(task.fields.get(k, "")) for k in ("info", "rate")).strip()
            _ACTIVITY["status"] = f"{task.description}: {task.completed:.0f}/{task.total:.0f} steps {fields}"


@contextlib.contextmanager
def heartbeat(label: str):
    """While the block runs in a non-interactive console, print a line whenever nothing was
    printed for :data:`HEARTBEAT_S` seconds: the stage, its elapsed time and the latest progress."""
    if console.is_terminal or is_quiet():
        yield
        return
    stop = threading.Event()
    started = time.time()
    _ACTIVITY["status"] = ""

    def beat() -> None:
        while not stop.wait(min(5.0, HEARTBEAT_S / 5)):
            if time.time() - _ACTIVITY["printed"] >= HEARTBEAT_S:
                status = f" - {_ACTIVITY['status']}" if _ACTIVITY["status"] else ""
                log(f"{label}: running for {time.time() - started:.0f} s{status}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def progress() -> Progress:
    """A progress bar with throughput (set the 'rate' field) and ETA."""
    return _Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=is_quiet() or not console.is_terminal,  # a CI log gets heartbeat lines instead of a bar's last frame
        transient=False,
    )


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[Text(fmt(v)) for v in r])  # cells are values (paths, names, library text), never markup
    return t


def show(t: Table) -> None:
    if not is_quiet():
        console.print(t)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)
