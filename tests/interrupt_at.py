"""Send a real signal to this process at an exact point of an ``edgekd`` stage.

    python tests/interrupt_at.py MARK NTH SIGNAL -- edgekd-args...

The signal (SIGINT or SIGKILL) is sent just before the NTH file whose final path contains MARK is
renamed into place: the artifact is fully written under its temporary name and not yet under its
final one, the worst moment to be interrupted. The quick stages (export, evaluate, bench, bundle)
finish in a second or two, too fast to hit by timing a signal from outside; this hits each of them
deterministically. tests/test_hardening.py runs SIGKILL through this script (it must end a
process) and SIGINT in its own process with :func:`signal_before_replace` (Ctrl-C raises
KeyboardInterrupt in the main thread either way; that saves a Python + torch start-up per stage).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator


@contextlib.contextmanager
def signal_before_replace(mark: str, nth: int, sig_name: str) -> Iterator[None]:
    """While inside, the NTH ``os.replace`` onto a path containing MARK first sends SIG_NAME to this
    process (and says so on stderr, so a caller can tell the point was reached)."""
    sig = getattr(signal, sig_name)
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if mark in os.fspath(dst):
            seen[0] += 1
            if seen[0] == nth:
                print(f"interrupt_at: {sig_name} before writing {os.fspath(dst)}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), sig)
        return real_replace(src, dst, *args, **kwargs)

    # Ctrl-C reaches a foreground process. A test run started in the background (nohup, `cmd &` in
    # a script) starts its children with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give this process the handler a terminal user's `edgekd` would have.
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    os.replace = replace
    try:
        yield
    finally:
        os.replace = real_replace
        signal.signal(signal.SIGINT, old_handler)


def main() -> None:
    sep = sys.argv.index("--")
    mark, nth, sig_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.argv = ["edgekd", *sys.argv[sep + 1:]]
    from edgekd.cli import main as edgekd_main

    with signal_before_replace(mark, nth, sig_name):
        edgekd_main()


if __name__ == "__main__":
    main()
