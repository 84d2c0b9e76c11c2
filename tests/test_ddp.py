"""The training loop under torchrun + DistributedDataParallel (gloo on CPU) matches one process.

Two ranks with per-rank batch 32 see the same global batch of 64 as one process with batch 64;
with BatchNorm statistics frozen (SyncBatchNorm needs CUDA) the averaged gradients, and so the
parameters after training, must be identical up to float rounding.
"""

import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import EDGEKD, json_out, run_inprocess, tiny_build
from edgekd.data import FASHION_MNIST_DEFAULT
from needs import needs_fmnist

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@contextlib.contextmanager
def one_thread():
    """Run this process's part single-threaded, as each rank is (OMP_NUM_THREADS=1): the order of a
    sum depends on the thread count, and these comparisons are at float-rounding size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@needs_fmnist
def test_qad_ranges_train_the_same_on_two_gloo_ranks(tmp_path):
    """QAD trains its activation ranges beside the DDP-wrapped model: their gradients are averaged over
    the ranks too, so 2 ranks at batch 32 end where one process at batch 64 does. (The weights' own
    gradients, through the fine-tune loop, are compared in test_torchrun_build_end_to_end_matches_one_process.)
    SGD: its step is linear in the gradient, so float rounding stays at rounding size; Adam's sign-like
    step turns a near-zero gradient's rounding noise into a full step at the ranges' learning rate."""
    json_out(run_inprocess("finetune", "--model", "pico_cnn", "--pretrained", "none", "--input-size", "28", "--train-subset", "256", "--test-subset", "64",
                           "--epochs", "1", "--batch-size", "64", "--set", "data.augment=none", "--no-resume", "--out", tmp_path / "start", "--json"))
    qad = ["quantize", str(tmp_path / "start" / "best.pt"), "--train-subset", "256", "--test-subset", "64", "--epochs", "1", "--calib-images", "64",
           "--calibrator", "max", "--learn-ranges", "--set", "quantize.train.optimizer=sgd", "--set", "quantize.range_lr=1.0", "--set", "data.augment=none",
           "--set", "quantize.train.min_steps=0", "--no-resume"]
    with one_thread():
        moved = json_out(run_inprocess(*qad, "--set", "quantize.train.batch_size=64", "--out", tmp_path / "qsingle", "--json"))["learned_ranges"]
    assert moved["quantizers"] >= 5 and max(abs(moved["lowest_ratio"] - 1), abs(moved["highest_ratio"] - 1)) > 1e-3, moved
    ddp = _torchrun(*qad, "--set", "quantize.train.batch_size=32", "--out", str(tmp_path / "qddp"), timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "qsingle" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "qddp" / "last.pt", weights_only=True)["state_dict"]
    ranges = [k for k in a if k.startswith("edgekd_act.") and k.endswith("._amax")]
    assert ranges
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), (k, a[k], b[k])


RUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_BUILD = ["--target", "x86-cpu", *tiny_build({"data.train_subset": 1000, "data.test_subset": 300, "bench.batches": "[1]", "data.augment": "none",
                                                   "student.augment": "none", "teacher.train.label_smoothing": 0, "teacher.train.freeze_bn": "true",
                                                   "student.train.freeze_bn": "true"})]


def _torchrun(*args: str, timeout: int = 400, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python", *(launcher or [EDGEKD]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=RUN_ENV, timeout=timeout)


def _no_edgekd_traceback(err: str) -> None:
    """torchrun prints its own ChildFailedError report; no frame of edgekd's code, no rich MarkupError."""
    repo = str(Path(__file__).resolve().parents[1] / "edgekd")
    assert f'File "{repo}' not in err and "MarkupError" not in err, err[-3000:]


@pytest.mark.slow
@needs_fmnist
def test_torchrun_build_end_to_end_matches_one_process(tmp_path):
    """The README's command on 2 gloo ranks: every stage, one manifest and bundle written by rank 0;
    teacher and control (BN frozen, no augmentation) equal to one process at the same global batch."""
    from edgekd.manifest import Manifest

    ddp = _torchrun("build", *TINY_BUILD, "--set", "teacher.train.batch_size=32", "--set", "student.train.batch_size=32",
                    "--set", "quantize.train.batch_size=32", "--out", str(tmp_path / "ddp"), "--json")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    lines = [ln for ln in ddp.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, ddp.stdout[-2000:]  # one JSON object: rank 0's
    res = json.loads(lines[0])
    assert all(s["status"] == "done" for s in res["stages"].values()) and set(res["stages"]) >= {"teacher", "qad", "export", "bundle"}
    assert Manifest(tmp_path / "ddp").verify() == [] and (tmp_path / "ddp" / "bundle" / "bundle.json").is_file()
    check = subprocess.run([sys.executable, "-m", "edgekd.runtime", "selfcheck", str(tmp_path / "ddp" / "bundle"), "--json"], capture_output=True, text=True,
                           cwd=str(tmp_path / "ddp" / "bundle"), timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    with one_thread():  # one process (this one), one thread as each rank
        one = json_out(run_inprocess("build", *TINY_BUILD, "--set", "teacher.train.batch_size=64", "--set", "student.train.batch_size=64",
                                     "--set", "quantize.train.batch_size=64", "--out", tmp_path / "one", "--json"))
    for stage in ("teacher", "control"):
        a = torch.load(tmp_path / "one" / stage / "best.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "ddp" / stage / "best.pt", weights_only=True)["state_dict"]
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-3), (stage, k)
    assert Manifest(tmp_path / "ddp").stage("teacher")["metrics"]["val_top1"] == Manifest(tmp_path / "one").stage("teacher")["metrics"]["val_top1"]
    assert abs(res["accuracy"] - one["accuracy"]) <= 0.03, (res["accuracy"], one["accuracy"])  # distill + QAD: the same within noise


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("stop, options", [("plateau", ["--epochs", "30", "--set", "teacher.train.patience=1"]),
                                           ("time", ["--epochs", "200", "--set", "teacher.train.time_limit_s=4"])])
def test_two_ranks_stop_together(tmp_path, stop, options):
    """Rank 0 alone validates and watches the clock; its decision reaches rank 1, so both stop after
    the same step and exit 0 (before, rank 1 went on into a collective call and failed)."""
    proc = _torchrun("finetune", "--model", "pico_cnn", "--pretrained", "none", "--input-size", "28", "--train-subset", "1200", "--test-subset", "200",
                     *options, "--no-resume", "--out", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stopped"] == stop and len(metrics["history"]) < int(options[1]), metrics["stopped"]
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["train_state"]["epoch"] == len(metrics["history"]) - 1
    val_share = [h["val_seconds"] / h["seconds"] for h in metrics["history"][:-1]]  # the last epoch may be cut short by the clock
    assert statistics.median(val_share) < 0.35  # validation on rank 0 is a small part of an epoch (200 val / 1,200 train images here)


@needs_fmnist
def test_a_failing_rank_ends_every_rank_with_one_line(tmp_path):
    """Rank 1 reads a corrupt copy of the data set (a node whose disk went bad): it prints its error
    on one line; rank 0 says rank 1 failed and why; both exit 1; no traceback of edgekd's."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(FASHION_MNIST_DEFAULT):
        (bad / name).symlink_to(Path(FASHION_MNIST_DEFAULT) / name)
    (bad / "train-images-idx3-ubyte.gz").unlink()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    launcher = tmp_path / "per_rank.sh"
    launcher.write_text(f'#!/bin/sh\n[ "$RANK" = 1 ] && export EDGEKD_FASHION_MNIST={bad}\nexec {EDGEKD} "$@"\n')
    launcher.chmod(0o755)
    proc = _torchrun("finetune", "--model", "pico_cnn", "--pretrained", "none", "--input-size", "28", "--train-subset", "256", "--test-subset", "64",
                     "--epochs", "1", "--out", str(tmp_path / "run"), launcher=[str(launcher)], timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert any(ln.startswith("error: rank 1 of 2: cannot read IDX file") for ln in errors), proc.stderr[-3000:]
    assert any(ln.startswith("error: rank 0 of 2 stopped: rank 1 failed: cannot read IDX file") for ln in errors), proc.stderr[-3000:]
    assert len(errors) == 2 and "exitcode: 1" in proc.stderr
    _no_edgekd_traceback(proc.stderr)


def test_library_text_is_printed_as_text_never_as_markup(capsys):
    """gloo's error text holds ``[/__w/pytorch/...]``, which rich read as a closing tag (MarkupError);
    every printer (log, warning, error line, table cell) now prints such text as it is."""
    from edgekd import ui

    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:29500"
    was = ui.is_quiet()
    ui.set_quiet(False)
    try:
        ui.log(f"rank 1: {gloo}")
        ui.warn(gloo)
        ui.error(f"rank 0 of 2 stopped: {gloo} [bold]not a style[/bold]")
        ui.show(ui.table("t", ["cell"], [["[/__w/gloo/pair.cc:561]"]]))
    finally:
        ui.set_quiet(was)
    err = capsys.readouterr().err
    assert err.count("pair.cc:561]") == 4 and "[bold]not a style[/bold]" in err
