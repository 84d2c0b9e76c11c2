"""What every host-side runner shares: the model's input specs, per-layer times, what it really
ran on, and the :class:`Runner` interface each runtime module implements (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from edgekd.errors import EdgekdError


@dataclass
class TensorSpec:
    """One model input: its name, shape (``None`` where the dimension is dynamic) and numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def batch_shape(self, batch: int) -> tuple[int, ...]:
        """The concrete shape for ``batch`` images; refuses a fixed batch dimension of another size."""
        if not self.shape:
            raise EdgekdError(f"input '{self.name}' is a scalar", "benchmark a model whose input is an image batch (N, C, H, W)")
        first = self.shape[0]
        if first is not None and first != batch:
            raise EdgekdError(f"input '{self.name}' has a fixed batch of {first}, cannot run batch {batch}",
                              "export with a dynamic batch axis, or pass --batch " + str(first))
        rest = tuple(1 if d is None else d for d in self.shape[1:])
        return (batch, *rest)


@dataclass
class LayerTime:
    """Time spent in one layer (node / fused kernel), averaged over the profiled runs."""

    name: str
    op: str
    mean_ms: float
    share: float = 0.0  # fraction of the summed layer time


@dataclass
class RuntimeInfo:
    """What the runner really used (after fallbacks), stored with every result."""

    runtime: str
    threads: int | None
    providers: list[str] = field(default_factory=list)
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """The interface every runtime implements (structural; no base class needed)."""

    info: RuntimeInfo

    def input_specs(self) -> list[TensorSpec]: ...

    def metadata(self) -> dict[str, str]: ...

    def prepare(self, arrays: dict[str, Any]) -> Any:
        """Turn host arrays into whatever ``timed_run`` consumes (pre-allocated, copied to device once)."""

    def timed_run(self, prepared: Any) -> tuple[int, float | None]:
        """Run once; return host wall time in ns and device-side time in ms where the runtime has one."""

    def outputs(self, prepared: Any) -> list[Any]: ...

    def layer_profile(self, arrays: dict[str, Any], runs: int) -> list[LayerTime]: ...

    def close(self) -> None: ...
