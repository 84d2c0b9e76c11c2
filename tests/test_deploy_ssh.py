"""Deploy over a REAL ssh connection to a loopback sshd (the 'device' is this machine)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, json_out, run_cli
from edgekd.bundle import BundleModel, make_bundle
from edgekd.deploy import deploy, parse_trtexec_times
from edgekd.errors import EdgekdError
from edgekd.manifest import Manifest
from edgekd.runners.ssh import SshDevice
from edgekd.targets import get_target

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def bundle_tar(pico_model, tmp_path_factory) -> Path:
    out = make_bundle(tmp_path_factory.mktemp("d") / "pico-deploy", BundleModel({"pico": pico_model.onnx}, "pico", pico_model.classes, pico_model.preprocess),
                      get_target("x86-cpu"), {"test_top1": 0.7}, sample_images=pico_model.images[:16])
    return out.with_name(out.name + ".tar.gz")


def _device(sshd, known_hosts: Path | None = None) -> SshDevice:
    return SshDevice(sshd.host, sshd.port, sshd.identity, known_hosts or sshd.known_hosts, python=sshd.python)


def test_deploy_checks_and_times_the_bundle_on_the_device(sshd, bundle_tar, tmp_path):
    remote = str(tmp_path / "device-home" / "pico")
    run_dir = tmp_path / "run"
    result = deploy(bundle_tar, _device(sshd), remote_dir=remote, runs=20, warmup=2, run_dir=run_dir)
    # The files really arrived through ssh and were verified there by the copy of the runtime inside the bundle.
    assert (Path(remote) / "SHA256SUMS").is_file() and (Path(remote) / "edgekd" / "runtime" / "__main__.py").is_file()
    check = result["selfcheck"]
    assert check["ok"] and check["checksums"] == "ok" and check["reference"]["top1_agreement"] == 1.0
    assert check["device"]["torch_loaded"] is False  # the device side never imports torch
    assert [r["batch"] for r in result["bench"]["latency"]] == [1, 64]
    assert all(r["p50_ms"] > 0 for r in result["bench"]["latency"])
    assert result["engine"] == {"built": False, "reason": "not a TensorRT target"}
    # Results land in the run manifest's 'deploy' stage, with no key material in them.
    m = Manifest(run_dir)
    stage = m.stage("deploy")
    assert stage["status"] == "done" and stage["metrics"]["device_p50_ms_b1"] == result["bench"]["latency"][0]["p50_ms"]
    assert not m.verify()
    text = (run_dir / "deploy.json").read_text() + (run_dir / "manifest.json").read_text()
    assert sshd.identity.read_text().split("\n")[1][:20] not in text and str(sshd.identity) not in text


def test_tampered_bundle_is_refused_on_the_device(sshd, bundle_tar, tmp_path):
    remote = tmp_path / "device-home" / "pico"
    deploy(bundle_tar, _device(sshd), remote_dir=str(remote), runs=10, warmup=1)
    onnx = remote / "model" / "pico.onnx"
    data = bytearray(onnx.read_bytes())
    data[100] ^= 0xFF
    onnx.write_bytes(bytes(data))
    dev = _device(sshd)
    proc = dev.run(f"cd {remote} && {dev.python} -m edgekd.runtime selfcheck . --json", check=False)
    assert proc.returncode == 2 and b"model/pico.onnx was modified" in proc.stderr


def test_unknown_host_key_is_refused_with_instructions(sshd, bundle_tar, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(EdgekdError) as err:
        deploy(bundle_tar, _device(sshd, empty), remote_dir=str(tmp_path / "never"))
    msg = str(err.value)
    assert "host key" in msg and "unknown" in msg and "ssh-keyscan" in msg and "ssh-keygen -lf" in msg
    assert not (tmp_path / "never").exists()


def test_changed_host_key_is_refused(sshd, bundle_tar, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kt, key = (tmp_path / "other_key.pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {kt} {key}\n")
    with pytest.raises(EdgekdError, match="different from the one in known_hosts"):
        _device(sshd, kh).check()


def test_wrong_key_and_closed_port_are_clear_errors(sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(EdgekdError, match="refused the login"):
        SshDevice(sshd.host, sshd.port, stranger, sshd.known_hosts).check()
    with pytest.raises(EdgekdError, match="cannot reach"):
        SshDevice(sshd.host, 1, sshd.identity, sshd.known_hosts, connect_timeout=3).check()


def test_missing_device_python_module_is_explained(sshd, bundle_tar, tmp_path):
    with pytest.raises(EdgekdError, match="--python"):
        deploy(bundle_tar, SshDevice(sshd.host, sshd.port, sshd.identity, sshd.known_hosts, python="/nonexistent/python3"), remote_dir=str(tmp_path / "p"), runs=10)


def test_cli_deploy_json_and_unknown_host_error(sshd, bundle_tar, tmp_path):
    args = ["deploy", str(bundle_tar), "--host", sshd.host, "--port", str(sshd.port), "--identity", str(sshd.identity),
            "--python", sshd.python, "--remote-dir", str(tmp_path / "cli"), "--runs", "10", "--warmup", "1"]
    out = json_out(run_cli(*args, "--known-hosts", str(sshd.known_hosts), "--json"))
    assert out["selfcheck"]["ok"] and out["bench"]["backend"] == "onnxruntime"
    empty = tmp_path / "kh"
    empty.write_text("")
    assert_one_line_error(run_cli(*args, "--known-hosts", str(empty)), "ssh-keyscan")


def test_bench_remote_times_on_the_device_and_regression_checks_work(sshd, bundle_tar, tmp_path):
    """`edgekd bench --remote`: the deploy path copies the bundle, times it on the device and brings the
    raw samples back, so the same statistics and baseline checks apply to device numbers."""
    args = ["bench", str(bundle_tar), "--target", "x86-cpu", "--remote", "--host", sshd.host, "--port", str(sshd.port), "--identity", str(sshd.identity),
            "--known-hosts", str(sshd.known_hosts), "--python", sshd.python, "--remote-dir", str(tmp_path / "rb"), "--runs", "30", "--warmup", "2",
            "-b", "1", "--threads", "1"]
    base = tmp_path / "base.json"
    out = json_out(run_cli(*args, "--save-baseline", str(base), "--json"))
    assert out["p50_ms"] > 0 and out["runs"] == 30
    assert len(json.loads(base.read_text())["samples_ms"]) == 30  # the device's raw samples came back
    assert out["fingerprint"]["host"] == f"{sshd.host}:{sshd.port}"
    assert (tmp_path / "rb" / "SHA256SUMS").is_file()  # it really went through the device folder
    again = run_cli(*args, "--baseline", str(base), "--max-regression", "400%", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert_one_line_error(run_cli(*[a for a in args if a not in (sshd.host,) and a != "--host"]), "--remote needs --host")


def test_parse_dla_fallback_names_each_layer_once():
    from edgekd.deploy import parse_dla_fallback

    log = ("[W] [TRT] Layer '/features/features.0/Conv' (CONVOLUTION): Unsupported on DLA. Switching this layer's device type to GPU.\n"
           "[I] [TRT] something else\n"
           "[W] [TRT] Default DLA is enabled but layer /head/Gemm is not supported on DLA, falling back to GPU.\n"
           "[W] [TRT] Layer '/features/features.0/Conv' (CONVOLUTION): Unsupported on DLA. Switching this layer's device type to GPU.\n")
    assert parse_dla_fallback(log) == ["/features/features.0/Conv", "/head/Gemm"]
    assert parse_dla_fallback("[I] [TRT] all layers on DLA\n") == []


def test_parse_trtexec_gpu_compute_time():
    log = ("[11/23/2025-10:00:00] [I] GPU Compute Time: min = 0.0212 ms, max = 0.1311 ms, mean = 0.0241 ms, median = 0.0236 ms, "
           "percentile(90%) = 0.0256 ms, percentile(95%) = 0.0266 ms, percentile(99%) = 0.0312 ms\n")
    assert parse_trtexec_times(log) == {"min_ms": 0.0212, "max_ms": 0.1311, "mean_ms": 0.0241, "median_ms": 0.0236, "p90_ms": 0.0256, "p95_ms": 0.0266, "p99_ms": 0.0312}
