"""CLI commands for bench (issue 6): ``edgekd bench MODEL_OR_BUNDLE [--target NAME]``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from edgekd import ui
from edgekd.cli_options import ConfigOpt, JsonOpt, SetOpt, emit, overrides
from edgekd.errors import EdgekdError

REGRESSION_EXIT = 1  # errors the user must fix exit 2 (cli.main); a measured regression exits 1


def _target_settings(name: str | None) -> dict[str, Any]:
    """Runtime, batches, threads, TensorRT options and latency budgets from targets/NAME.toml."""
    if not name:
        return {}
    from edgekd.targets import accelerator_present, get_target  # lazy: `edgekd --help` and light commands import no torch/onnx

    t = get_target(name)
    avail = accelerator_present(t)
    options: dict[str, Any] = {}
    if t.runtime == "tensorrt":
        options = {"precision": t.precision, "batch": t.batch, "dla_core": t.dla.core, "gpu_fallback": t.dla.gpu_fallback, "tensorrt": t.tensorrt}
    elif t.runtime == "openvino":
        options = {"device": t.openvino_device}
    return {"name": t.name, "runtime": t.runtime, "batches": sorted({1, t.batch}), "threads": t.threads, "options": options,
            "budgets": {1: t.latency_budget.batch1_ms, t.batch: t.latency_budget.batch_ms}, "available": avail.ok, "why": avail.reason}


def _show(result: dict[str, Any], budgets: dict[int, float]) -> None:
    """A busy-machine warning, the latency table (against the budgets), the reference and the profile."""
    from edgekd.bench import busy_machine_note  # lazy: `edgekd --help` and light commands import no torch/onnx

    note = busy_machine_note(result)
    if note:
        ui.warn(note)
    rows = []
    for s in result["sweep"]:
        budget = budgets.get(s["batch"])
        verdict = "-" if budget is None else ("ok" if s["p50_ms"] <= budget else "OVER")
        rows.append([s["batch"], s["runs"], f"{s['p50_ms']:.4f}", f"{s['p90_ms']:.4f}", f"{s['p99_ms']:.4f}", f"{s['mean_ms']:.4f}",
                     f"{s['std_ms']:.4f}", f"{s['min_ms']:.4f}", f"{s['throughput']:.1f}",
                     "-" if s.get("device_p50_ms") is None else f"{s['device_p50_ms']:.4f}", "-" if budget is None else f"{budget} ({verdict})"])
    fp = result["fingerprint"]
    title = f"{Path(result['model']).name} on {result['runtime']} ({fp['cpu_model']}, {result['threads'] or '-'} threads{', ' + fp['gpu'] if fp.get('gpu') else ''})"
    ui.show(ui.table(title, ["batch", "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "min ms", "img/s", "device p50 ms", "budget ms"], rows))
    ref = result.get("reference")
    if ref:
        ui.log(f"reference {Path(ref['model']).name}: p50 {ref['p50_ms']:.4f} ms, model/reference = {ref['ratio_p50']:.3f} (interleaved runs)")
    if result.get("profile"):
        ui.show(ui.table(f"slowest layers (batch {result['batch']})", ["layer", "op", "mean ms", "share"],
                         [[p["name"], p["op"], f"{p['mean_ms']:.4f}", f"{p['share']:.1%}"] for p in result["profile"]]))


def bench(
    model: Annotated[str, typer.Argument(help="An .onnx / .engine file, or a bundle directory (model.onnx or bundle.json naming the model).")],
    target: Annotated[Optional[str], typer.Option(help="Target name (targets/*.toml): picks runtime, batch, threads and latency budgets.")] = None,
    runtime: Annotated[Optional[str], typer.Option(help="ort-cpu, openvino, ort-cuda, ort-tensorrt or tensorrt (overrides the target's). \\[default: ort-cpu]")] = None,
    batch: Annotated[Optional[list[int]], typer.Option("--batch", "-b", help="Batch size; repeat for a sweep (the first is the primary). \\[default: 1 and the target's batch]")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Untimed runs first. \\[default: 20]")] = None,
    runs: Annotated[Optional[int], typer.Option(help="Timed runs per batch size. \\[default: 200]")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Time for this many seconds per batch size instead of a fixed --runs.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op / OpenVINO inference threads. \\[default: physical cores]")] = None,
    input_source: Annotated[str, typer.Option("--input", help="'random', 'fashion-mnist' (real test images) or a .npy of preprocessed samples.")] = "random",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed for the input samples and the bootstrap.")] = 0,
    profile: Annotated[bool, typer.Option("--profile", help="Per-layer profile (onnxruntime profiler / OpenVINO performance counters / TensorRT IProfiler) in a separate pass.")] = False,
    top: Annotated[int, typer.Option(min=1, help="Layers shown by --profile.")] = 10,
    reference: Annotated[Optional[str], typer.Option(help="A second model timed interleaved with MODEL; regressions are judged on the ratio, so a slower machine does not count.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Baseline JSON to compare against; exits 1 on a regression.")] = None,
    max_regression: Annotated[str, typer.Option(help="Allowed slowdown vs the baseline, e.g. 10%.")] = "10%",
    confidence: Annotated[float, typer.Option(min=0.5, max=0.9999, help="One-sided confidence needed to call a regression.")] = 0.95,
    save_baseline: Annotated[Optional[Path], typer.Option(help="Write this run as a baseline JSON.")] = None,
    allow_other_machine: Annotated[bool, typer.Option("--allow-other-machine", help="Compare with a baseline from another machine / runtime / thread count.")] = False,
    precision: Annotated[Optional[str], typer.Option(help="TensorRT engine precision when building from ONNX: int8, fp16, fp32.")] = None,
    dla_core: Annotated[Optional[int], typer.Option(min=0, help="TensorRT: run on this DLA core (GPU fallback on).")] = None,
    remote: Annotated[bool, typer.Option("--remote", help="Measure on the target device through the deploy path (needs a bundle and --host).")] = False,
    host: Annotated[Optional[str], typer.Option(help="--remote: user@device, reached with ssh (host key must already be known).")] = None,
    port: Annotated[int, typer.Option(help="--remote: SSH port.")] = 22,
    identity: Annotated[Optional[Path], typer.Option(help="--remote: SSH private key.")] = None,
    known_hosts: Annotated[Optional[Path], typer.Option(help="--remote: known_hosts file holding the device's host key.")] = None,
    python: Annotated[str, typer.Option("--python", help="--remote: the device's Python (needs numpy, onnxruntime, pillow).")] = "python3",
    remote_dir: Annotated[Optional[str], typer.Option(help="--remote: folder on the device for the bundle (replaced). \\[default: edgekd-bundles/<bundle name>]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Time a model (p50/p90/p99, throughput, batch sweep), optionally against a baseline.

    Examples:
      edgekd bench runs/x/model.onnx --target x86-cpu
      edgekd bench model.onnx --runtime ort-cpu -b 1 -b 64 --profile --json
      edgekd bench model.onnx --runtime openvino -b 1 -b 64 --profile
      edgekd bench model.onnx --reference ref.onnx --save-baseline benchmarks/baselines/nano.json
      edgekd bench model.onnx --reference ref.onnx --baseline benchmarks/baselines/nano.json --max-regression 10%
    """
    from edgekd.bench import BenchRequest, TimingPlan, run_bench  # lazy: `edgekd --help` and light commands import no torch/onnx

    tgt = _target_settings(target)
    recipe = _bench_recipe(config, set_, warmup, runs, batch, threads)
    batches = batch or tgt.get("batches") or recipe.bench.batches
    runtime_name, options = _runtime_choice(tgt, runtime, batches, precision, dla_core)
    judge = _baseline_judge(baseline, max_regression, allow_other_machine, confidence)  # validate before spending minutes measuring
    if remote:
        result = _remote(model, tgt, batches, recipe.bench, threads, _ssh_device(host, port, identity, known_hosts, python), remote_dir)
    else:
        _check_runs_here(tgt, runtime)
        req = BenchRequest(model=model, runtime=runtime_name, batches=batches, plan=TimingPlan(recipe.bench.warmup, recipe.bench.runs, duration),
                           threads=recipe.bench.threads, input_source=input_source, seed=seed, reference=reference,
                           profile_top=top if profile else 0, runtime_options=options, target=tgt.get("name"))
        result = run_bench(req, progress=ui.log)
    budgets = tgt.get("budgets", {}) if runtime_name == tgt.get("runtime") else {}
    if _report(result, budgets, save_baseline, judge, as_json):
        sys.exit(REGRESSION_EXIT)


def _bench_recipe(config: Path | None, set_: list[str] | None, warmup: int | None, runs: int | None, batch: list[int] | None,
                  threads: int | None) -> Any:
    """The recipe's bench section with --warmup, --runs, --batch and --threads over it (validated there)."""
    from edgekd.config import load_recipe  # lazy: `edgekd --help` and light commands import no torch/onnx

    return load_recipe(config, (set_ or []) + overrides({"bench.warmup": warmup, "bench.runs": runs, "bench.batches": batch, "bench.threads": threads}))


def _runtime_choice(tgt: dict[str, Any], runtime: str | None, batches: list[int], precision: str | None,
                    dla_core: int | None) -> tuple[str, dict[str, Any]]:
    """The runtime to time on and its options: the target's, then --precision / --dla-core, then TensorRT's batch range."""
    runtime_name = runtime or tgt.get("runtime") or "ort-cpu"
    same = runtime_name == tgt.get("runtime") or (runtime_name == "ort-tensorrt" and tgt.get("runtime") == "tensorrt")  # the EP takes the target's options too
    options = dict(tgt.get("options", {})) if same else {}
    if precision:
        if precision not in ("int8", "fp16", "fp32"):
            raise EdgekdError(f"unknown precision '{precision}'", "use int8, fp16 or fp32")
        options["precision"] = precision
    if dla_core is not None:
        options["dla_core"] = dla_core
    if runtime_name == "tensorrt":
        options.setdefault("batch", batches[0])
        options.setdefault("max_batch", max(batches))
    return runtime_name, options


def _ssh_device(host: str | None, port: int, identity: Path | None, known_hosts: Path | None, python: str) -> Any:
    """--remote: the device to measure on."""
    from edgekd.runners.ssh import SshDevice  # lazy: `edgekd --help` and light commands import no torch/onnx

    if not host:
        raise EdgekdError("--remote needs --host user@device", "e.g. --remote --host jetson@192.168.1.20 --known-hosts ~/.ssh/known_hosts")
    return SshDevice(host, port, identity, known_hosts, python)


def _check_runs_here(tgt: dict[str, Any], runtime: str | None) -> None:
    """A target whose hardware is absent here is measured on the device, unless --runtime says what to use here."""
    if tgt and not tgt["available"] and not runtime:
        raise EdgekdError(f"target '{tgt['name']}' cannot run here: {tgt['why']}", "measure on the device with --remote, or pick --runtime ort-cpu")


def _report(result: dict[str, Any], budgets: dict[int, float], save_baseline: Path | None, judge: Callable[[dict[str, Any]], Any] | None,
            as_json: bool) -> bool:
    """Show the result, write it as a baseline, judge it against one, print it for --json; True on a regression."""
    _show(result, budgets)
    if save_baseline:
        written = save_baseline_file(save_baseline, result)
        ui.log(f"baseline written: {written}")
        result["baseline_written"] = str(written)
    comparison = judge(result) if judge else None
    emit(_json_view(result), as_json)
    return comparison is not None and comparison.is_regression


def _baseline_judge(baseline: Path | None, max_regression: str, allow_other_machine: bool, confidence: float) -> Callable[[dict[str, Any]], Any] | None:
    """Read --max-regression and --baseline now, so a bad one fails before minutes of measuring; the
    function returned judges a result against the baseline (None without --baseline)."""
    from edgekd.bench import load_baseline, parse_percent  # lazy: `edgekd --help` and light commands import no torch/onnx

    budget = parse_percent(max_regression)
    if not baseline:
        return None
    base = load_baseline(baseline)
    return lambda result: _compare(result, base, str(baseline), budget, allow_other_machine, confidence)


def _compare(result: dict[str, Any], base: dict[str, Any], baseline_name: str, budget: float, allow_other_machine: bool, confidence: float) -> Any:
    """Judge ``result`` against the baseline, say the verdict, and record it in ``result``."""
    from edgekd.bench import check_regression  # lazy: `edgekd --help` and light commands import no torch/onnx

    comparison = check_regression(result, base, budget, allow_other_machine, confidence, baseline_name)
    for n in comparison.notes:
        ui.warn(n)
    (ui.warn if comparison.verdict in ("regression", "possible-regression") else ui.log)(comparison.message())
    result["comparison"] = comparison.to_dict()
    return comparison


def _json_view(result: dict[str, Any]) -> dict[str, Any]:
    """The result for --json: the statistics without the raw samples."""
    return {k: v for k, v in result.items() if k not in ("samples_ms", "device_samples_ms")} | _ref_without_samples(result)


def save_baseline_file(path: Path, result: dict[str, Any]) -> Path:
    from edgekd.bench import save_baseline  # lazy: `edgekd --help` and light commands import no torch/onnx

    return save_baseline(path, result, command=" ".join(["edgekd", *sys.argv[1:]]))


def _ref_without_samples(result: dict[str, Any]) -> dict[str, Any]:
    ref = result.get("reference")
    return {"reference": {k: v for k, v in ref.items() if k != "samples_ms"}} if ref else {}


def _remote(model: str, tgt: dict[str, Any], batches: list[int], bench_cfg: Any, threads: int | None, device: Any, remote_dir: str | None) -> dict[str, Any]:
    """Time on the device through ``edgekd.deploy.remote_bench``; statistics are computed here, the same way."""
    from edgekd.bench import TimingPlan, resolve_model_path, summarize  # lazy: `edgekd --help` imports no numpy/onnxruntime
    from edgekd.deploy import remote_bench  # lazy: the SSH path, only for --remote

    if not tgt:
        raise EdgekdError("--remote needs --target", "name the device's target, e.g. --target jetson-orin-nano")
    plan = TimingPlan(bench_cfg.warmup, bench_cfg.runs)  # the device times a fixed number of runs (no --duration)
    path = resolve_model_path(model)
    sweep, first = [], None
    for b in batches:
        got = remote_bench(model, target=tgt["name"], batch=b, plan=plan, threads=threads, device=device, remote_dir=remote_dir)
        stats = summarize(got["samples_ms"], b, got.get("device_samples_ms"))
        sweep.append(stats.to_dict())
        first = first or got
    return dict(sweep[0]) | {"model": str(path), "runtime": tgt["runtime"], "threads": first.get("threads"), "target": tgt["name"], "sweep": sweep,
                             "samples_ms": first["samples_ms"], "device_samples_ms": first.get("device_samples_ms", []),
                             "fingerprint": first["fingerprint"], "profile": [], "load_average": {}}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("bench")(bench)
