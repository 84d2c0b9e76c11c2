"""Features by module path through forward hooks (torchdistill's way): no model code changes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from edgekd.errors import EdgekdError
from edgekd.models import resolve_module


class FeatureHook:
    """Keep the output of the module at ``path`` on every forward pass (torchdistill-style).

    >>> hook = FeatureHook(model, "features", "student")   # doctest: +SKIP
    >>> model(x); hook.output.shape                         # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, path: str, who: str = "model"):
        try:
            module = resolve_module(model, path)
        except EdgekdError as exc:
            raise EdgekdError(f"{who} has no layer '{path}'", f"pass --{who}-layer with a module path; {exc.hint}") from exc
        self.path = path
        self.output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output

    def remove(self) -> None:
        self._handle.remove()
        self.output = None
