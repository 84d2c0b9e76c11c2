"""``python3 -m edgekd.runtime ...``: see :mod:`edgekd.runtime.cli`."""

import sys

from edgekd.runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
