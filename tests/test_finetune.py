"""The teacher stage (`edgekd finetune`) end to end through the real CLI: train, metrics, resume, and clear errors for bad input."""

import json
import os
import time
import subprocess

import pytest
import torch

from cli_helpers import EDGEKD, assert_one_line_error, json_out, run_cli, run_inprocess
from edgekd.models import create_model, load_checkpoint
from needs import needs_fmnist

TINY = ["--train-subset", "512", "--test-subset", "256", "--input-size", "48", "--batch-size", "64"]


@needs_fmnist
def test_finetune_quick_writes_checkpoint_and_metrics_and_resumes(tmp_path):
    out = tmp_path / "teacher"
    res = json_out(run_inprocess("finetune", "--epochs", "1", *TINY, "--out", out, "--json"))
    assert res["test_top1"] > 0.25  # 8 steps of full fine-tuning at 48 px: 0.40 measured on these 256 images; chance is 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"top1", "loss", "per_class", "confusion"}
    assert len(metrics["test"]["confusion"]) == 10 and sum(map(sum, metrics["test"]["confusion"])) == 256
    ck = load_checkpoint(out / "best.pt")  # weights_only load of a self-describing checkpoint
    assert ck["kind"] == "teacher" and ck["model"]["name"] == "efficientnet_lite0" and ck["preprocess"]["input_size"] == 48
    # a second epoch resumes from last.pt instead of starting over... but the settings changed:
    assert_one_line_error(run_inprocess("finetune", "--epochs", "2", *TINY, "--out", out), "other training settings")
    # same settings: resume finds the run finished and does no further epoch
    again = json_out(run_inprocess("finetune", "--epochs", "1", *TINY, "--out", out, "--json"))
    assert json.loads((out / "metrics.json").read_text())["history"] == metrics["history"]
    assert again["test_top1"] == res["test_top1"]


@needs_fmnist
def test_linear_probe_trains_only_the_head(tmp_path):
    out = tmp_path / "probe"
    res = json_out(run_inprocess("finetune", "--mode", "linear-probe", "--epochs", "2", "--lr", "0.01", *TINY, "--out", out, "--json"))
    assert res["test_top1"] > 0.3  # 16 head-only steps on frozen ImageNet features (~0.42 measured): 3x chance
    ck = load_checkpoint(out / "best.pt")
    ref = create_model("efficientnet_lite0", 10, pretrained="offline", input_size=48).state_dict()
    body = [k for k in ref if not k.startswith("classifier")]  # weights and BN statistics alike
    assert all(torch.equal(ck["state_dict"][k], ref[k]) for k in body)
    assert not torch.equal(ck["state_dict"]["classifier.weight"], ref["classifier.weight"])


@needs_fmnist
def test_frozen_stages_keep_the_stem_and_early_stages_as_pretrained(tmp_path):
    out = tmp_path / "frozen"
    res = json_out(run_inprocess("finetune", "--set", "teacher.frozen_stages=2", "--epochs", "1", *TINY, "--out", out, "--json"))
    assert res["test_top1"] > 0.3
    ck = load_checkpoint(out / "best.pt")
    ref = create_model("efficientnet_lite0", 10, pretrained="offline", input_size=48).state_dict()
    weights = [k for k in ref if k.endswith(".weight")]
    frozen = [k for k in weights if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert frozen and all(torch.equal(ck["state_dict"][k], ref[k]) for k in frozen)
    assert not torch.equal(ck["state_dict"]["blocks.2.0.conv_pw.weight"], ref["blocks.2.0.conv_pw.weight"])
    assert not torch.equal(ck["state_dict"]["classifier.weight"], ref["classifier.weight"])


@needs_fmnist
def test_frozen_stages_on_a_network_without_stages_or_too_many_is_one_line(tmp_path):
    assert_one_line_error(run_inprocess("finetune", "--model", "nano_cnn", "--pretrained", "none", "--set", "teacher.frozen_stages=1",
                                        "--out", tmp_path / "a"), "has no group_matcher")
    assert_one_line_error(run_inprocess("finetune", "--set", "teacher.frozen_stages=8", "--out", tmp_path / "b"), "has only 7 stages")


@needs_fmnist
def test_resume_after_interruption_continues_from_last_epoch(tmp_path):
    """Kill a 4-epoch run (SIGKILL, nothing to clean up) once its first epoch is saved, then run
    the same command again: it resumes from last.pt instead of starting over, keeps the killed
    run's finished epochs, and ends with all four and no temporary files."""
    out = tmp_path / "r"
    args = [EDGEKD, "finetune", "--model", "pico_cnn", "--pretrained", "none", "--input-size", "28", "--train-subset", "1024",
            "--test-subset", "256", "--batch-size", "32", "--epochs", "4", "--out", str(out), "--json"]
    env = {**os.environ, "EDGEKD_QUIET": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (out / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    killed = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert killed["epoch"] < 3, "the run finished before it could be interrupted: make it longer"
    resumed = subprocess.run(args, capture_output=True, text=True, env={**env, "EDGEKD_QUIET": "0"}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming fine-tune pico_cnn after epoch {killed['epoch'] + 1}/4" in resumed.stderr.replace("\n", " ")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == killed["epoch"] + 1 and len(metrics["history"]) == 4
    assert metrics["history"][: killed["epoch"] + 1] == killed["history"]  # the killed run's epochs, kept as they were
    assert not [p.name for p in out.iterdir() if p.suffix == ".tmp"]  # no half-written file left by the kill


@needs_fmnist
def test_bad_inputs_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    weights = tmp_path / "w.pth"
    torch.save(create_model("resnet18", 10).state_dict(), weights)
    corrupt = tmp_path / "c"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    cases = [
        (["--data-root", str(tmp_path / "nowhere")], "Fashion-MNIST not found"),
        (["--dataset", "imagefolder", "--data-root", str(empty)], "no class sub-folders"),
        (["--dataset", "imagefolder", "--data-root", str(tmp_path / "nowhere")], "dataset folder not found"),
        (["--model", "efficientnet_b99"], "unknown teacher model 'efficientnet_b99'"),
        (["--pretrained", str(weights), "--train-subset", "64"], "another architecture"),
        (["--epochs", "-1"], "teacher.train.epochs"),
        (["--mode", "sideways"], "teacher.mode"),
        (["--lr", "0"], "teacher.train.lr"),
        (["--train-subset", "64", "--test-subset", "64", "--input-size", "48", "--epochs", "1", "--out", str(corrupt)], "truncated or corrupt"),
        (["--set", "teacher.bogus=1"], "teacher.bogus: unknown key"),
    ]
    for extra, needle in cases:
        args = ["finetune", *extra] if "--out" in extra else ["finetune", *extra, "--out", str(tmp_path / "o")]
        assert_one_line_error(run_inprocess(*args), needle)


@pytest.mark.parametrize("command, shown", [
    ("finetune", ["--epochs", "[default: 1]", "[default: 0.001]", "[default: all]", "[default: fashion-mnist]", "[default: 48]", "[default: 0]"]),
    ("distill", ["[default: nano_cnn]", "[default: 0.5]", "[default: 1]", "[default: 8]", "[default: 0.003]"]),
    ("quantize", ["[default: auto]", "[default: 0.0001]", "--learn-ranges --fixed-ranges", "[default: learn]"]),
    ("export", ["[default: the target's, else int8]", "[default: 17]"]),
    ("bench", ["[default: 200]", "[default: 10%]"]),
    ("build", ["[default: the recipe's, x86-cpu]", "[default: nano_cnn]"]),
])
def test_help_shows_every_default(command, shown):
    """The defaults are written into the help texts (the options fall back on the recipe); rich markup
    must not eat "[default: ...]" as a style tag, which it did until the brackets were escaped."""
    proc = run_cli(command, "--help", env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for needle in shown:
        assert needle in text, (command, needle)
