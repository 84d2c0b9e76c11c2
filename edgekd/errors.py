"""One exception type for every user-facing failure.

The CLI catches :class:`EdgekdError` and prints ``error: <what> (<hint>)`` on one line with a
non-zero exit, no traceback unless ``--debug``. Library callers get a normal exception they can
catch. Anything that is *not* an EdgekdError is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgekdError(Exception):
    """A problem the user can fix; ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f" ({self.hint.rstrip('.')})"
        return text.replace("\n", " ")
