"""Shared fixtures: a real loopback SSH device and a small real model exported to ONNX.

``sshd`` starts ``/usr/sbin/sshd`` on 127.0.0.1 (a free port) with fresh host and user keys, as in
FACTS.md "A real SSH device on loopback"; the 'device' is this machine, its Python the one running
the tests (it has numpy, pillow, onnxruntime). ``pico_model`` trains pico_cnn briefly on real
Fashion-MNIST images and exports it with the TorchScript ONNX exporter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``, the default in pyproject.toml) each worker gets one thread, and
    so do the edgekd processes it starts: two workers with two OpenMP threads each on two cores
    spin against each other and are slower than one worker. Image folders are decoded into a
    temporary cache, never into the user's ~/.cache/edgekd."""
    import atexit
    import tempfile

    cache = tempfile.mkdtemp(prefix="edgekd-test-images-")
    os.environ["EDGEKD_DATA_CACHE"] = cache
    atexit.register(shutil.rmtree, cache, True)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@dataclass
class LoopbackSshd:
    host: str
    port: int
    identity: Path
    known_hosts: Path
    python: str
    host_pub: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc_log: Path, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on {port}: {proc_log.read_text() if proc_log.exists() else ''}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real sshd on 127.0.0.1 that accepts only a fresh key; skipped where sshd cannot run."""
    if not Path(SSHD).is_file():
        pytest.skip(f"{SSHD} not installed (apt-get install openssh-server)")
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("ssh client not installed")
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd recipe needs root (it logs in as the current user via a privilege-separated sshd)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    port = _free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'user_key.pub'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nUsePAM no\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = d / "sshd.log"
    subprocess.run([SSHD, "-f", str(config), "-E", str(log)], check=True)
    try:
        _wait_for_port(port, log)
        host_pub = d / "host_key.pub"
        key_type, key = host_pub.read_text().split()[:2]
        known_hosts = d / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        yield LoopbackSshd(f"{user}@127.0.0.1", port, d / "user_key", known_hosts, sys.executable, host_pub, log)
    finally:
        pid_file = d / "sshd.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@dataclass
class PicoModel:
    model: object
    onnx: Path
    classes: list
    preprocess: object
    images: object  # uint8 (N, 1, 28, 28) real test images
    labels: object


@pytest.fixture(scope="session")
def pico_model(tmp_path_factory: pytest.TempPathFactory, pico_2000_ckpt, fmnist_2000) -> PicoModel:
    """``pico_2000_ckpt`` (the one trained pico_cnn the suite shares) exported to ONNX (dynamic batch),
    with 64 real held-out test images."""
    import torch

    from edgekd.models import model_from_checkpoint

    model = model_from_checkpoint(pico_2000_ckpt).eval()
    test = fmnist_2000.test
    out = tmp_path_factory.mktemp("pico") / "pico.onnx"
    torch.onnx.export(model, model.preprocess(test.images[:2]), str(out), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return PicoModel(model, out, list(fmnist_2000.classes), model.preprocess, test.images[:64].numpy(), test.labels[:64].numpy())


@pytest.fixture(scope="session")
def fmnist_600():
    """600 real Fashion-MNIST training images (val and test: 200 each), shared by the distillation tests."""
    from needs import skip_without_fmnist  # lazy, as the other imports here: needs imports edgekd.data (torch)

    skip_without_fmnist()
    from edgekd.data import load_dataset

    return load_dataset("fashion-mnist", train_subset=600, test_subset=200, seed=0)


@pytest.fixture(scope="session")
def teacher_32px(tmp_path_factory: pytest.TempPathFactory, fmnist_600) -> Path:
    """A real teacher checkpoint: pico_cnn at 32 px (so its maps are larger than a 28-px student's), three short epochs."""
    import torch

    from edgekd.config import TrainConfig
    from edgekd.models import create_model
    from edgekd.train import cross_entropy_loss, fit, FitOptions

    torch.manual_seed(0)
    model = create_model("pico_cnn", fmnist_600.num_classes, in_chans=1, input_size=32)
    out = tmp_path_factory.mktemp("teacher32")
    fit(model, fmnist_600, TrainConfig(epochs=3, batch_size=32, lr=5e-3, warmup_epochs=0.0), out, cross_entropy_loss(), model.preprocess, FitOptions(augment="flip", kind="teacher"))
    return out / "best.pt"


@pytest.fixture(scope="session")
def fmnist_2000():
    """2,000 real Fashion-MNIST training images (val: 200) and 300 test images, shared by the quantization tests."""
    from needs import skip_without_fmnist  # lazy, as the other imports here: needs imports edgekd.data (torch)

    skip_without_fmnist()
    from edgekd.config import DataConfig
    from edgekd.data import load_data

    return load_data(DataConfig(train_subset=2000, test_subset=300), 0)


@pytest.fixture(scope="session")
def pico_2000_ckpt(tmp_path_factory: pytest.TempPathFactory, fmnist_2000) -> Path:
    """pico_cnn trained two epochs on ``fmnist_2000``: the FP32 student the quantization tests start from."""
    import torch

    from edgekd.config import TrainConfig
    from edgekd.models import create_model
    from edgekd.train import cross_entropy_loss, fit, FitOptions

    torch.manual_seed(0)
    m = create_model("pico_cnn", 10)
    out = tmp_path_factory.mktemp("pico2000")
    fit(m, fmnist_2000, TrainConfig(epochs=2, batch_size=64, lr=3e-3), out, cross_entropy_loss(), m.preprocess, FitOptions(augment="none", resume=False))
    return out / "best.pt"
