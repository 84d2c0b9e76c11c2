"""Stage: bench. Latency you can trust - timing, statistics, fingerprints, baselines and regression checks.

Method (after trtexec's and pyperf's practice): warm up, then time a fixed number of runs (or a
duration) with ``time.perf_counter_ns`` around one inference call on inputs allocated once, with
Python's garbage collector paused; report percentiles rather than the mean, because latency
distributions are skewed by the OS. Every result carries a hardware/software fingerprint.

Regression decision (noise-aware): the statistic is the ratio of medians, current / baseline. Its
uncertainty comes from a percentile bootstrap (Efron & Tibshirani, *An Introduction to the
Bootstrap*, 1993, ch. 13). A run is a **regression** only when, with the stated confidence (one
sided, default 95%), the slowdown exceeds the budget; a point estimate over budget whose bound is
not is reported as *possible* (more runs will settle it). When a reference model is given, both
models are timed interleaved (ABBA order) and the statistic becomes
``(model / reference) now  /  (model / reference) in the baseline``, so a machine that is slower
today (thermal state, a busy neighbour, a different clock) does not read as a regression.

No torch import in this package: it runs on the device next to onnxruntime.

stats.py (percentiles, bootstrap, decision), fingerprint.py, inputs.py (model lookup, input
batches), timing.py (the loops), stage.py (run_bench), baseline.py (save, load, check).
"""

from edgekd.bench.baseline import BASELINE_FORMAT, BASELINE_VERSION, baseline_from_result, check_regression, load_baseline, save_baseline
from edgekd.bench.fingerprint import MACHINE_KEYS, fingerprint, fingerprint_differences
from edgekd.bench.inputs import bundle_preprocess, resolve_model_path, sample_inputs
from edgekd.bench.stage import BenchRequest, busy_machine_note, run_bench
from edgekd.bench.stats import DEFAULT_CONFIDENCE, Comparison, LatencyStats, bootstrap_ratio, compare_samples, decide, parse_percent, summarize
from edgekd.runners.timing import TimingPlan, time_interleaved, time_runner

__all__ = ["BASELINE_FORMAT", "BASELINE_VERSION", "DEFAULT_CONFIDENCE", "MACHINE_KEYS", "BenchRequest", "Comparison", "LatencyStats", "TimingPlan",
           "baseline_from_result", "bootstrap_ratio", "bundle_preprocess", "busy_machine_note", "check_regression", "compare_samples", "decide",
           "fingerprint", "fingerprint_differences", "load_baseline", "parse_percent", "resolve_model_path", "run_bench", "sample_inputs",
           "save_baseline", "summarize", "time_interleaved", "time_runner"]
