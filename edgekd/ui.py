"""Console output: progress bars and tables go to stderr, so ``--json`` keeps stdout clean."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
_QUIET = {"on": os.environ.get("EDGEKD_QUIET") == "1"}
_DEBUG = {"on": os.environ.get("EDGEKD_DEBUG") == "1"}


def set_quiet(quiet: bool) -> None:
    _QUIET["on"] = quiet


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


def log(msg: str) -> None:
    if not is_quiet():
        console.print(msg)


def warn(msg: str) -> None:
    """Warnings are shown even when quiet: a slower or less accurate INT8 model must be loud."""
    console.print(f"[bold yellow]WARNING[/]: {msg}")


def progress() -> Progress:
    """A progress bar with throughput (set the 'rate' field) and ETA."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=is_quiet(),
        transient=False,
    )


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def show(t: Table) -> None:
    if not is_quiet():
        console.print(t)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)
