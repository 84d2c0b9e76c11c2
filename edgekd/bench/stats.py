"""Latency statistics and the noise-aware regression decision: percentiles, a bootstrap of the
ratio of medians, and the verdict with its confidence (the method is in the package docstring).

No torch import: this runs on the device next to onnxruntime.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError

DEFAULT_CONFIDENCE = 0.95


@dataclass
class LatencyStats:
    """Summary of one batch size's timed runs, in milliseconds per call (one call = one batch)."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # images per second at the median latency
    device_p50_ms: float | None = None  # runtime-side time (e.g. CUDA events) where available

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(samples_ms: Any, batch: int, device_ms: Any = None) -> LatencyStats:
    """Percentiles (linear interpolation), mean, sample std and throughput of per-call latencies.

    >>> summarize([1.0, 2.0, 3.0, 4.0], batch=2).p50_ms
    2.5
    """
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise EdgekdError("no timed runs to summarize", "use --runs 10 or more")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    dev = None if device_ms is None or len(device_ms) == 0 else float(np.median(np.asarray(device_ms, dtype=np.float64)))
    return LatencyStats(batch=batch, runs=int(x.size), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                        mean_ms=float(x.mean()), std_ms=float(x.std(ddof=1)) if x.size > 1 else 0.0,
                        min_ms=float(x.min()), max_ms=float(x.max()), throughput=float(batch * 1000.0 / p50) if p50 > 0 else float("inf"),
                        device_p50_ms=dev)


def _boot_medians(samples: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.median(samples[idx], axis=1)


def bootstrap_ratio(current: Any, baseline: Any, current_ref: Any = None, baseline_ref: Any = None,
                    n_boot: int = 2000, seed: int = 0) -> tuple[float, np.ndarray]:
    """Ratio of medians current/baseline (or of model/reference ratios) and its bootstrap distribution.

    With references, a run's model and reference samples were taken interleaved, so they are
    resampled as pairs (same indices), keeping the shared drift of the machine inside each pair.
    """
    rng = np.random.default_rng(seed)
    cur, base = np.asarray(current, np.float64), np.asarray(baseline, np.float64)
    if cur.size < 5 or base.size < 5:
        raise EdgekdError(f"too few runs to compare ({cur.size} now, {base.size} in the baseline)", "use --runs 50 or more")
    i_cur = rng.integers(0, cur.size, size=(n_boot, cur.size))
    i_base = rng.integers(0, base.size, size=(n_boot, base.size))
    if current_ref is None:
        point = float(np.median(cur) / np.median(base))
        boots = _boot_medians(cur, i_cur) / _boot_medians(base, i_base)
        return point, boots
    cref, bref = np.asarray(current_ref, np.float64), np.asarray(baseline_ref, np.float64)
    if cref.size != cur.size or bref.size != base.size:
        raise EdgekdError("model and reference sample counts differ", "measure both in the same interleaved run")
    point = float((np.median(cur) / np.median(cref)) / (np.median(base) / np.median(bref)))
    boots = (_boot_medians(cur, i_cur) / _boot_medians(cref, i_cur)) / (_boot_medians(base, i_base) / _boot_medians(bref, i_base))
    return point, boots


@dataclass
class Comparison:
    """The regression decision and the numbers behind it."""

    verdict: str  # "regression" | "possible-regression" | "ok" | "faster"
    ratio: float  # current / baseline (>1 = slower)
    low: float  # one-sided lower confidence bound of the ratio
    high: float  # one-sided upper confidence bound of the ratio
    confidence: float
    budget: float  # allowed slowdown, e.g. 0.10
    mode: str  # "absolute" or "reference"
    current_p50_ms: float
    baseline_p50_ms: float
    notes: list[str] = field(default_factory=list)

    @property
    def is_regression(self) -> bool:
        return self.verdict == "regression"

    def message(self) -> str:
        """One sentence with the size of the change and how sure we are."""
        pct = lambda r: f"{(r - 1) * 100:+.1f}%"  # noqa: E731
        conf = f"{self.confidence:.0%}"
        what = f"median {self.current_p50_ms:.4g} ms vs {self.baseline_p50_ms:.4g} ms in the baseline"
        if self.mode == "reference":
            what += "; compared as the ratio to the reference model timed in the same runs"
        if self.verdict == "regression":
            return (f"latency regression: {pct(self.ratio)} slower ({what}); with {conf} confidence the slowdown is at least "
                    f"{pct(self.low)}, over the {self.budget:.0%} budget")
        if self.verdict == "possible-regression":
            return (f"possible latency regression: {pct(self.ratio)} ({what}), over the {self.budget:.0%} budget, but not with {conf} "
                    f"confidence (lower bound {pct(self.low)}); rerun with more --runs to settle it")
        if self.verdict == "faster":
            return f"faster than the baseline: {pct(self.ratio)} ({what}; {conf} upper bound {pct(self.high)}); consider --save-baseline"
        return f"no regression: {pct(self.ratio)} ({what}; {conf} bounds {pct(self.low)} .. {pct(self.high)}, budget {self.budget:.0%})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["message"] = self.message()
        return d


def decide(ratio: float, boots: np.ndarray, budget: float, confidence: float = DEFAULT_CONFIDENCE) -> tuple[str, float, float]:
    """Verdict from the bootstrap distribution of the ratio: (verdict, lower bound, upper bound).

    "faster" needs a speed-up of at least half the budget with confidence: on a quiet machine a 0.1%
    change is statistically real but is noise to the user, and must not invite a new baseline."""
    if not 0 < confidence < 1:
        raise EdgekdError(f"confidence must be between 0 and 1, got {confidence}", "use e.g. 0.95")
    low, high = (float(v) for v in np.quantile(boots, [1 - confidence, confidence]))
    if low > 1 + budget:
        return "regression", low, high
    if ratio > 1 + budget:
        return "possible-regression", low, high
    if high < 1.0 - budget / 2:  # a real speed-up worth re-baselining, not a significant 0.1%
        return "faster", low, high
    return "ok", low, high


def compare_samples(current: Any, baseline: Any, budget: float, current_ref: Any = None, baseline_ref: Any = None,
                    confidence: float = DEFAULT_CONFIDENCE, n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Compare two sets of latency samples (ms) against a slowdown budget (0.10 = 10%).

    >>> rng = np.random.default_rng(0)
    >>> base = 1.0 + 0.02 * rng.standard_normal(200)
    >>> compare_samples(base * 1.3, base, budget=0.10).verdict
    'regression'
    """
    if budget < 0:
        raise EdgekdError(f"the regression budget must be >= 0, got {budget}", "e.g. --max-regression 10%")
    use_ref = current_ref is not None and baseline_ref is not None
    ratio, boots = bootstrap_ratio(current, baseline, current_ref if use_ref else None, baseline_ref if use_ref else None, n_boot, seed)
    verdict, low, high = decide(ratio, boots, budget, confidence)
    return Comparison(verdict, ratio, low, high, confidence, budget, "reference" if use_ref else "absolute",
                      float(np.median(current)), float(np.median(baseline)))


def parse_percent(text: str | float) -> float:
    """'10%' -> 0.10, '0.1' -> 0.10, '10' -> 0.10 (a bare number over 1 is read as percent)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
        if not m:
            raise EdgekdError(f"cannot read '{text}' as a percentage", "write e.g. 10% or 0.1")
        if m.group(2):
            return float(m.group(1)) / 100.0  # '400%' is a 4.0 budget, not 0.04
        value = float(m.group(1))
    return value / 100.0 if value > 1 else value
