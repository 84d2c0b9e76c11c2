"""The training loop under torchrun + DistributedDataParallel (gloo on CPU) matches one process.

Two ranks with per-rank batch 32 see the same global batch of 64 as one process with batch 64;
with BatchNorm statistics frozen (SyncBatchNorm needs CUDA) the averaged gradients, and so the
parameters after training, must be identical up to float rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import EDGEKD
from edgekd.data import FASHION_MNIST_DEFAULT
from edgekd.models import create_model

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT), reason="needs Fashion-MNIST")
def test_two_gloo_ranks_match_single_process(tmp_path):
    common = ["finetune", "--model", "pico_cnn", "--pretrained", "none", "--input-size", "28", "--train-subset", "256", "--test-subset", "64",
              "--epochs", "1", "--set", "teacher.train.freeze_bn=true", "--set", "data.augment=none", "--set", "teacher.train.label_smoothing=0", "--no-resume"]
    env = {**os.environ, "EDGEKD_QUIET": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([EDGEKD, *common, "--batch-size", "64", "--out", str(tmp_path / "single")], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python", EDGEKD, *common, "--batch-size", "32", "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 0
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-5, rtol=1e-4), k
    torch.manual_seed(0)  # the run's seed: rebuild its initial weights to show training really moved them
    init = create_model("pico_cnn", 10).state_dict()
    assert not torch.allclose(a["state_dict"]["features.0.0.weight"], init["features.0.0.weight"])

    # QAD trains its activation ranges beside the DDP-wrapped model: their gradients are averaged over the ranks too
    # (SGD: its step is linear in the gradient, so float rounding stays at rounding size; Adam's sign-like
    # step turns a near-zero gradient's rounding noise into a full step at the ranges' learning rate)
    qad = ["quantize", str(tmp_path / "single" / "best.pt"), "--train-subset", "256", "--test-subset", "64", "--epochs", "1", "--calib-images", "64",
           "--calibrator", "max", "--learn-ranges", "--set", "quantize.train.optimizer=sgd", "--set", "quantize.range_lr=1.0", "--set", "data.augment=none",
           "--set", "quantize.train.min_steps=0", "--no-resume"]
    single = subprocess.run([EDGEKD, *qad, "--set", "quantize.train.batch_size=64", "--out", str(tmp_path / "qsingle"), "--json"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    moved = json.loads(single.stdout.strip().splitlines()[-1])["learned_ranges"]
    assert moved["quantizers"] >= 5 and max(abs(moved["lowest_ratio"] - 1), abs(moved["highest_ratio"] - 1)) > 1e-3, moved
    ddp = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python", EDGEKD, *qad, "--set", "quantize.train.batch_size=32",
                          "--out", str(tmp_path / "qddp")], capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "qsingle" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "qddp" / "last.pt", weights_only=True)["state_dict"]
    ranges = [k for k in a if k.startswith("edgekd_act.") and k.endswith("._amax")]
    assert ranges
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
