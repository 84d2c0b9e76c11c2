"""CLI commands for deploy (issue 5): `edgekd deploy BUNDLE --host user@device`.

Example: edgekd deploy runs/jetson/bundle.tar.gz --host jetson@192.168.1.20 --identity ~/.ssh/id_ed25519
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.cli_options import JsonOpt, emit


def deploy_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder or .tar.gz (from `edgekd build`).")],
    host: Annotated[str, typer.Option("--host", help="user@device to deploy to.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="SSH port.")] = 22,
    identity: Annotated[Optional[Path], typer.Option("--identity", "-i", help="Private key file for the login.")] = None,
    known_hosts: Annotated[Optional[Path], typer.Option("--known-hosts", help="known_hosts file holding the device's host key (default: ~/.ssh/known_hosts). Unknown keys are refused.")] = None,
    remote_dir: Annotated[Optional[str], typer.Option("--remote-dir", help="Folder on the device (replaced). \\[default: edgekd-bundles/<bundle name>]")] = None,
    python: Annotated[str, typer.Option("--python", help="Device Python with numpy, pillow, onnxruntime (no torch needed).")] = "python3",
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per batch size on the device.")] = 200,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up runs before timing.")] = 20,
    engine: Annotated[bool, typer.Option("--engine/--no-engine", help="Build the TensorRT engine on the device when trtexec is there.")] = True,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder whose manifest gets a 'deploy' stage (and deploy.json).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a bundle to a device over SSH, verify it there, build the TensorRT engine there, and time it there.

    Host keys are verified (StrictHostKeyChecking=yes); add a new device with ssh-keyscan and check its fingerprint first.
    """
    from edgekd.deploy import deploy  # lazy: `edgekd --help` and light commands import no torch/onnx
    from edgekd.runners.ssh import device_from_options  # lazy: `edgekd --help` and light commands import no torch/onnx

    device = device_from_options(host, port, identity, known_hosts, python)
    result = deploy(bundle, device, remote_dir, runs, warmup, engine, run_dir)
    ref = result["selfcheck"].get("reference", {})
    rows = [[r["batch"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["images_per_s"], r.get("budget_ms"), r.get("within_budget")] for r in result["bench"]["latency"]]
    ui.show(ui.table(f"{result['bundle']} on {result['device']} ({result['bench']['backend']}; selfcheck top-1 agreement {ref.get('top1_agreement')})",
                     ["batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "budget ms", "within"], rows))
    if result["engine"].get("built") is False and result["target"] and "not a TensorRT" not in result["engine"]["reason"]:
        ui.warn(f"TensorRT engine not built: {result['engine']['reason']}; the timings above are onnxruntime's")
    emit(result, as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("deploy")(deploy_command)
