"""Run ``edgekd ARGS`` and send this process a real signal at an exact point of a stage.

    python tests/interrupt_at.py MARK NTH SIGNAL -- edgekd-args...

The signal (SIGINT or SIGKILL) is sent just before the NTH file whose final path contains MARK is
renamed into place: the artifact is fully written under its temporary name and not yet under its
final one, the worst moment to be interrupted. The quick stages (export, evaluate, bench, bundle)
finish in a second or two, too fast to hit by timing a signal from outside; this hits each of them
deterministically. Used by tests/test_hardening.py.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    sep = sys.argv.index("--")
    mark, nth, sig_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sig = getattr(signal, sig_name)
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if mark in os.fspath(dst):
            seen[0] += 1
            if seen[0] == nth:
                print(f"interrupt_at: {sig_name} before writing {os.fspath(dst)}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), sig)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    # Ctrl-C reaches a foreground process. A test run started in the background (nohup, `cmd &` in
    # a script) starts its children with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give this process the handler a terminal user's `edgekd` would have.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["edgekd", *sys.argv[sep + 1:]]
    from edgekd.cli import main as edgekd_main

    edgekd_main()


if __name__ == "__main__":
    main()
