"""Hardening (issue 7): bad input, interruptions, reproducibility and trust, tried for real.

Every bad input must end in one ``error: ...`` line that says what is wrong and what to do, a
non-zero exit, no traceback (unless ``--debug``), and no partial artifact. The interruption test
SIGINTs and SIGKILLs a real tiny ``edgekd build`` in every stage and reruns it to a valid
manifest. docs/hardening.md is the table of what was tried and what happened.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import EDGEKD, assert_one_line_error, json_out, run_cli, run_inprocess, tiny_build
from edgekd.errors import EdgekdError
from edgekd.manifest import Manifest
from edgekd.atomic import write_json_atomic
from needs import needs_fmnist

ENV = {"OMP_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parents[1]
PICO = tiny_build({"teacher.train.epochs": None, "student.train.epochs": None, "data.train_subset": None, "data.test_subset": None,
                   "quantize.train.epochs": None})  # each test sets its own sizes


# ----------------------------------------------------------------------------- every option at bad values
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real pico checkpoint (a teacher and a student look alike to the CLI), a real ONNX and a bundle folder."""
    from edgekd.bundle import BundleModel, make_bundle
    from edgekd.models import create_model, save_checkpoint

    d = tmp_path_factory.mktemp("inputs")
    model = create_model("pico_cnn", 10)
    ck = save_checkpoint(d / "pico.pt", model, [str(i) for i in range(10)], "teacher")
    onnx_path = d / "pico.onnx"
    torch.onnx.export(model.eval(), torch.zeros(1, 1, 28, 28), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    bundle = make_bundle(d / "bundle", BundleModel({"model": onnx_path}, "model", [str(i) for i in range(10)], model.preprocess.to_dict()),
                         {"name": "x86-cpu", "runtime": "ort-cpu"})
    return {"ck": ck, "onnx": onnx_path, "bundle": bundle, "dir": d}


# (command line, what the one error line must say). {ck} {onnx} {bundle} {out} are filled in.
BAD_OPTIONS = [
    # numbers that are not numbers, for each command (Click's message, now one line and exit 2)
    ("--threads abc models", "Invalid value for '--threads'"),
    ("finetune --epochs abc --out {out}", "Invalid value for '--epochs'"),
    ("finetune --lr 1e-3x --out {out}", "Invalid value for '--lr'"),
    ("models --input-size abc", "Invalid value for '--input-size'"),
    ("distill --teacher {ck} --temperature warm --out {out}", "Invalid value for '--temperature'"),
    ("quantize {ck} --calib-images many --out {out}", "Invalid value for '--calib-images'"),
    ("export {ck} --target x86-cpu --opset x --out {out}", "Invalid value for '--opset'"),
    ("bench {onnx} --runs abc", "Invalid value for '--runs'"),
    ("bench {onnx} --duration abc", "Invalid value for '--duration'"),
    ("build --seed abc --out {out}", "Invalid value for '--seed'"),
    ("deploy {bundle} --host a@b --port ssh", "Invalid value for '--port'"),
    # zero and negative numbers
    ("--threads 0 models", "'--threads'"),
    ("finetune --input-size 0 --out {out}", "teacher.input_size"),
    ("finetune --batch-size 0 --out {out}", "teacher.train.batch_size"),
    ("finetune --epochs -1 --out {out}", "teacher.train.epochs"),
    ("finetune --lr -1 --out {out}", "teacher.train.lr"),
    ("finetune --label-smoothing -0.1 --out {out}", "teacher.train.label_smoothing"),
    ("finetune --train-subset 0 --out {out}", "data.train_subset"),
    ("finetune --test-subset -5 --out {out}", "data.test_subset"),
    ("finetune --seed -1 --out {out}", "seed: Input should be greater than or equal to 0"),
    ("models --input-size 0", "'--input-size'"),
    ("models --in-chans -1", "'--in-chans'"),
    ("models --num-classes 0", "'--num-classes'"),
    ("distill --teacher {ck} --temperature 0 --out {out}", "distill.temperature"),
    ("distill --teacher {ck} --alpha 1.5 --out {out}", "distill.alpha"),
    ("distill --teacher {ck} --feature-weight -1 --out {out}", "distill.feature_weight"),
    ("distill --teacher {ck} --relation-weight -1 --out {out}", "distill.relation_weight"),
    ("distill --teacher {ck} --width 0 --out {out}", "student.width"),
    ("distill --teacher {ck} --input-size 8 --out {out}", "student.input_size"),
    ("distill --teacher {ck} --batch-size 0 --out {out}", "student.train.batch_size"),
    ("distill --teacher {ck} --teacher-weights a,b --out {out}", "not a comma-separated list of numbers"),
    ("quantize {ck} --calib-images 0 --out {out}", "quantize.calib_images"),
    ("quantize {ck} --epochs -1 --out {out}", "quantize.train.epochs"),
    ("quantize {ck} --lr 0 --out {out}", "quantize.train.lr"),
    ("export {ck} --target x86-cpu --opset 0 --out {out}", "export.opset"),
    ("export {ck} --target x86-cpu --check-batch 0 --out {out}", "export.check_batch"),
    ("bench {onnx} --batch 0", "batch sizes must be >= 1"),
    ("bench {onnx} --runs 0", "bench.runs"),
    ("bench {onnx} --warmup -1", "bench.warmup"),
    ("bench {onnx} --duration 0", "--duration must be positive"),
    ("bench {onnx} --threads -2", "bench.threads"),
    ("bench {onnx} --top 0", "'--top'"),
    ("bench {onnx} --confidence 2", "'--confidence'"),
    ("bench {onnx} --dla-core -1", "'--dla-core'"),
    ("bench {onnx} --max-regression -5%", "as a percentage"),
    ("build --seed -1 --out {out}", "seed"),
    ("deploy {bundle} --host a@b --port 0", "'--port'"),
    ("deploy {bundle} --host a@b --runs 0", "'--runs'"),
    ("deploy {bundle} --host a@b --warmup -1", "'--warmup'"),
    # enum options at unknown values
    ("finetune --mode sideways --out {out}", "teacher.mode"),
    ("finetune --optimizer adam2 --out {out}", "teacher.train.optimizer"),
    ("finetune --dataset nosuchset --out {out}", "unknown dataset 'nosuchset'"),
    ("distill --teacher {ck} --augment rotate --out {out}", ".augment: Input should be"),
    ("distill --teacher {ck} --loss kd,magic --out {out}", "distill.losses"),
    ("distill --teacher {ck} --student resnet9000 --out {out}", "unknown student model 'resnet9000'"),
    ("quantize {ck} --calibrator guess --out {out}", "quantize.calibrator"),
    ("export {ck} --precision int4 --out {out}", "unknown precision 'int4'"),
    ("export {ck} --target nowhere --out {out}", "unknown target 'nowhere'"),
    ("bench {onnx} --runtime nnapi", "unknown runtime 'nnapi'"),
    ("bench {onnx} --input webcam", "unknown input source 'webcam'"),
    ("bench {onnx} --precision int4", "unknown precision 'int4'"),
    ("bench {onnx} --target nowhere", "unknown target 'nowhere'"),
    ("build --target nowhere --out {out}", "unknown target 'nowhere'"),
    ("build --until deploy --out {out}", "unknown stage 'deploy'"),
    ("build --student resnet9000 --out {out}", "unknown student model 'resnet9000'"),
    ("build --set teacher.model=vit_nonexistent --out {out}", "unknown teacher model 'vit_nonexistent'"),
    ("targets show nowhere", "unknown target 'nowhere'"),
    ("targets list --targets-dir {out}/missing", "targets folder not found"),
    # the command line itself
    ("finetune --no-such-option", "No such option: --no-such-option"),
    ("bench", "Missing argument"),
    ("frobnicate", "No such command"),
    ("build --set teacher.train.epochs", "not key=value"),
]


@pytest.mark.parametrize("line, needle", BAD_OPTIONS, ids=[c[0].split(" {")[0][:60] for c in BAD_OPTIONS])
def test_bad_option_values_give_one_line_errors(files, tmp_path, line, needle):
    args = line.format(ck=files["ck"], onnx=files["onnx"], bundle=files["bundle"], out=tmp_path / "o").split()
    assert_one_line_error(run_inprocess(*args), needle)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pt")), "nothing may be trained before the error"


def test_usage_errors_from_the_console_script_are_one_line_exit_2(files):
    """The subprocess path (what users and CI see): Click usage errors and validation errors alike."""
    assert_one_line_error(run_cli("finetune", "--epochs", "abc"), "Invalid value for '--epochs'")
    assert_one_line_error(run_cli("bench", files["onnx"], "--runs", "0"), "bench.runs")


def test_debug_shows_the_traceback(files):
    proc = run_cli("--debug", "bench", files["onnx"], "--runtime", "nnapi")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "unknown runtime 'nnapi'" in proc.stderr


# ----------------------------------------------------------------------------- recipe files
@pytest.mark.parametrize("name, content, needle", [
    ("r.yaml", "teacher: {model: pico_cnn\n", "not valid YAML"),
    ("r.toml", "[teacher\nmodel = 'x'\n", "not valid TOML"),
    ("r.yaml", "- a\n- b\n", "must hold a mapping"),
    ("r.yaml", "tacher:\n  model: pico_cnn\n", "tacher: unknown key"),
    ("r.toml", "[student.train]\nepochz = 3\n", "student.train.epochz: unknown key"),
    ("r.yaml", "student:\n  train:\n    epochs: three\n", "student.train.epochs"),
    ("r.yaml", "seed: !!python/object/apply:os.system ['touch {marker}']\n", "not valid YAML"),
    ("r.yaml", b"\xff\xfe\x00binary\x00", "not valid YAML"),
])
def test_bad_recipe_files(tmp_path, name, content, needle):
    p = tmp_path / name
    marker = tmp_path / "pwned"  # what the YAML payload would create if the recipe were loaded unsafely
    p.write_bytes(content if isinstance(content, bytes) else content.replace("{marker}", str(marker)).encode())
    assert_one_line_error(run_inprocess("build", "-c", p, "--out", tmp_path / "o"), needle)
    assert not marker.exists()


def test_recipe_path_that_is_missing_or_a_folder(tmp_path):
    assert_one_line_error(run_inprocess("build", "-c", tmp_path / "nope.yaml", "--out", tmp_path / "o"), "config file not found")
    assert_one_line_error(run_inprocess("build", "-c", tmp_path, "--out", tmp_path / "o"), "config file not found")


# ----------------------------------------------------------------------------- dataset folders
def _image_folder(root: Path, classes=("a", "b"), n=4, bad: dict | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 24, 3), dtype=np.uint8)).convert(["RGB", "L", "RGBA", "P"][i % 4]).save(root / c / f"{i}.png")
    for rel, data in (bad or {}).items():
        (root / rel).write_bytes(data)
    return root


def test_dataset_folders_that_cannot_train(tmp_path):
    unreadable = tmp_path / "unreadable"
    for c in ("a", "b"):
        (unreadable / c).mkdir(parents=True)
        (unreadable / c / "x.png").write_bytes(b"not a png at all")
        (unreadable / c / "y.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    one = _image_folder(tmp_path / "one", classes=("only",))
    (tmp_path / "empty").mkdir()
    base = ["finetune", "--dataset", "imagefolder", "--model", "pico_cnn", "--pretrained", "none", "--out", tmp_path / "o", "--data-root"]
    assert_one_line_error(run_inprocess(*base, unreadable), "none of the 4 images")
    assert_one_line_error(run_inprocess(*base, one), "only one class")
    assert_one_line_error(run_inprocess(*base, tmp_path / "empty"), "no class sub-folders")
    assert_one_line_error(run_inprocess(*base, tmp_path / "missing"), "dataset folder not found")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pt"))


def test_a_warning_with_a_long_path_stays_on_one_line(monkeypatch, tmp_path):
    """A CI log is 80 columns wide and no terminal: a path cut in two cannot be found with grep."""
    from rich.console import Console

    from edgekd import ui
    log = Console(file=open(tmp_path / "log.txt", "w"), width=80, force_terminal=False)
    monkeypatch.setattr(ui, "console", log)
    long_path = "/tmp/" + "deep/" * 30 + "broken.png"
    ui.warn(f"skipped 1 unreadable image(s), e.g. {long_path}")
    monkeypatch.setitem(ui._QUIET, "on", False)
    ui.log(f"data from {long_path}")
    log.file.close()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith(long_path) and lines[1].endswith(long_path)


def test_folder_with_mixed_sizes_modes_and_a_truncated_image_trains(tmp_path):
    """Mixed sizes and modes are decoded to one size; the truncated file is skipped, not fatal."""
    root = _image_folder(tmp_path / "mixed", n=6, bad={"a/broken.png": b"\x89PNG\r\n\x1a\n\x00\x00truncated"})
    proc = run_cli("finetune", "--dataset", "imagefolder", "--data-root", root, "--model", "pico_cnn", "--pretrained", "none",
                   "--input-size", "28", "--epochs", "1", "--batch-size", "4", "--out", tmp_path / "o", "--json", env=ENV)
    json_out(proc)
    assert "skipped 1 unreadable image" in proc.stderr and "broken.png" in proc.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    # the 12 readable images, and only they, were split up: 20% test (2), 10% of the other 10 for validation (1)
    assert sum(map(sum, metrics["test"]["confusion"])) == metrics["test"]["n"] == 2 and metrics["val"]["n"] == 1
    assert (tmp_path / "o" / "best.pt").is_file()


# ----------------------------------------------------------------------------- checkpoints
class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def bad_checkpoints(files, tmp_path):
    from edgekd.models import create_model

    good = files["ck"].read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[: len(good) // 2])
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": "edgekd-checkpoint", "payload": _RunsCode(str(marker))}, evil)
    other = tmp_path / "other.pt"  # a pico checkpoint whose weights are a nano_cnn's
    ck = torch.load(files["ck"], weights_only=True)
    ck["state_dict"] = create_model("nano_cnn", 10).state_dict()
    torch.save(ck, other)
    plain = tmp_path / "plain.pt"
    torch.save(create_model("pico_cnn", 10).state_dict(), plain)
    return {"trunc": trunc, "evil": evil, "other": other, "plain": plain, "marker": marker}


@pytest.mark.parametrize("which, needle", [("trunc", "truncated or corrupt"), ("evil", "refusing to load"), ("other", "do not fit a pico_cnn"),
                                           ("plain", "not an edgekd checkpoint")])
@needs_fmnist
def test_bad_checkpoints_in_every_command_that_reads_one(bad_checkpoints, tmp_path, which, needle):
    ck = bad_checkpoints[which]
    for args in (["distill", "--teacher", ck, "--student", "pico_cnn", "--train-subset", "64", "--test-subset", "64", "--out", tmp_path / "d"],
                 ["quantize", ck, "--train-subset", "64", "--test-subset", "64", "--out", tmp_path / "q"],
                 ["export", ck, "--target", "x86-cpu", "--out", tmp_path / "e"],
                 ["build", "--teacher", ck, *PICO, "--set", "data.train_subset=64", "--set", "data.test_subset=64", "--out", tmp_path / "b"]):
        assert_one_line_error(run_inprocess(*args), needle)
    assert not bad_checkpoints["marker"].exists(), "the pickle's code ran"
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- ONNX files
@pytest.fixture()
def bad_onnx(files, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    good = files["onnx"].read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good[: len(good) // 3])
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf\n")
    rank2 = tmp_path / "rank2.onnx"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    w = helper.make_tensor("W", TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "W"], ["logits"])], "flat", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, rank2)
    return {"trunc": trunc, "junk": junk, "rank2": rank2}


@pytest.mark.parametrize("which", ["trunc", "junk"])
def test_broken_onnx_files_everywhere(bad_onnx, which):
    from edgekd import runtime
    from edgekd.runners.ort import cpu_session

    path = bad_onnx[which]
    assert_one_line_error(run_inprocess("bench", path, "--runs", "10"), "cannot load")
    with pytest.raises(EdgekdError, match="cannot load"):
        cpu_session(path)
    with pytest.raises(EdgekdError, match="cannot load"):
        runtime.OrtModel(path)


def test_onnx_with_the_wrong_input_rank(bad_onnx, tmp_path):
    """bench times any model (the input is built from its own signature), but real images cannot feed a
    flat input; the on-device runtime refuses the model when it loads."""
    from edgekd import runtime

    with pytest.raises(EdgekdError, match="rank-2 input"):
        runtime.OrtModel(bad_onnx["rank2"])


@needs_fmnist
def test_bench_with_real_images_refuses_a_flat_input(bad_onnx):
    proc = run_inprocess("bench", bad_onnx["rank2"], "--runs", "10", "--input", "fashion-mnist")
    assert_one_line_error(proc, "not an image batch")


# ----------------------------------------------------------------------------- bundles
def test_tampered_bundle_is_refused_before_any_connection(files, tmp_path):
    """`edgekd deploy` verifies the checksums on the host first: the tamper error comes before ssh is tried."""
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(files["bundle"], bundle)
    (bundle / "labels.txt").write_text("cat\ndog\n")
    assert_one_line_error(run_inprocess("deploy", bundle, "--host", "nobody@192.0.2.1", "--port", "9"), "labels.txt was modified")
    (bundle / "labels.txt").unlink()
    assert_one_line_error(run_inprocess("deploy", bundle, "--host", "nobody@192.0.2.1", "--port", "9"), "labels.txt is missing")


# ----------------------------------------------------------------------------- full disk
@pytest.fixture()
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root); skipped where mounting is refused (the RLIMIT_FSIZE test covers that case)."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def _no_partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


def test_full_disk_while_writing_artifacts(tiny_tmpfs, files):
    from edgekd.bundle import BundleModel, make_bundle
    from edgekd.models import create_model, save_checkpoint

    (tiny_tmpfs / "filler").write_bytes(b"\0" * (1024 * 1024 - 40 * 1024))  # leave ~40 KiB
    with pytest.raises(EdgekdError, match="disk full"):
        write_json_atomic(tiny_tmpfs / "big.json", {"x": "y" * 100_000})
    with pytest.raises(EdgekdError, match="disk full"):  # torch.save hides ENOSPC in a RuntimeError
        save_checkpoint(tiny_tmpfs / "best.pt", create_model("nano_cnn", 10), ["a"], "student")
    with pytest.raises(EdgekdError, match="disk full"):
        pre = json.loads((files["bundle"] / "bundle.json").read_text())["preprocess"]
        make_bundle(tiny_tmpfs / "bundle", BundleModel({"model": files["onnx"]}, "model", [str(i) for i in range(10)], pre),
                    {"name": "x86-cpu", "runtime": "ort-cpu"})
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler"], "a partial artifact was left"


@needs_fmnist
def test_full_disk_during_a_cli_run(tiny_tmpfs):
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (1024 * 1024 - 60 * 1024))
    proc = run_cli("finetune", "--model", "small_cnn", "--pretrained", "none", "--input-size", "28", "--epochs", "1", "--train-subset", "256",
                   "--test-subset", "64", "--out", tiny_tmpfs / "run", env=ENV)
    assert_one_line_error(proc, "disk full")
    assert _no_partial_files(tiny_tmpfs) == [] and not (tiny_tmpfs / "run" / "best.pt").exists()


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))


@needs_fmnist
def test_file_size_limit_during_a_cli_run(tmp_path):
    """Without root (no tmpfs): RLIMIT_FSIZE in the child makes every write past 200 KiB fail."""
    env = {**os.environ, "EDGEKD_QUIET": "1", **ENV}
    proc = subprocess.run([EDGEKD, "finetune", "--model", "small_cnn", "--pretrained", "none", "--input-size", "28", "--epochs", "1",
                           "--train-subset", "256", "--test-subset", "64", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, preexec_fn=_limit_file_size, timeout=300)
    assert_one_line_error(proc, "disk full (or file size limit reached)")
    assert _no_partial_files(tmp_path) == [] and not (tmp_path / "run" / "best.pt").exists()


# ----------------------------------------------------------------------------- interruptions, resume, secrets
SECRET = "AKIAedgekdSECRETvalue9f3e1"
TOKEN = "ghp_edgekdTOKENvalue7c2d"


def _build_args(out: Path, extra: list[str]) -> list[str]:
    return ["build", "--target", "x86-cpu", *PICO, *extra, "--out", str(out), "--json"]


def _kill_build(out: Path, extra: list[str], mark: str, nth: int) -> subprocess.CompletedProcess:
    """The build in a process of its own, SIGKILLed just before the NTH write to MARK (tests/interrupt_at.py)."""
    env = {**os.environ, "EDGEKD_QUIET": "1", **ENV}
    cmd = [sys.executable, str(ROOT / "tests" / "interrupt_at.py"), mark, str(nth), "SIGKILL", "--", *_build_args(out, extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _build_here(out: Path, extra: list[str], ctrl_c: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """The build in this process (the CLI's own entry point), with a real SIGINT to this process just
    before the NTH write to MARK when ``ctrl_c`` = (MARK, NTH). A KeyboardInterrupt that escaped the CLI
    would end the whole test session: it fails this test instead."""
    from interrupt_at import signal_before_replace

    try:
        if ctrl_c is None:
            return run_inprocess(*_build_args(out, extra))
        with signal_before_replace(ctrl_c[0], ctrl_c[1], "SIGINT"):
            return run_inprocess(*_build_args(out, extra))
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C before {ctrl_c} escaped edgekd's CLI as a KeyboardInterrupt")


def _interrupt_points(out: Path) -> list[tuple[str, str, int, int | None]]:
    """(stage, mark, nth write for SIGINT, nth write for SIGKILL or None): the signal lands just before
    that artifact is renamed into place. Training stages are hit after their first epoch was saved,
    so the rerun has something to resume from. SIGKILL is sent once per kind of write (a training
    checkpoint, the export's staging folder, a record, the bundle's temp folder): distill and qad
    write through the same training loop as the teacher, evaluate like bench."""
    return [("teacher", f"{out}/teacher/last.pt", 2, 2), ("distill", f"{out}/student/last.pt", 2, None), ("qad", f"{out}/qad/last.pt", 2, None),
            ("export", f"{out}/export/", 1, 2), ("evaluate", f"{out}/evaluate.json", 1, None), ("bench", f"{out}/bench.json", 1, 1),
            ("bundle", f"{out}/bundle", 1, 2)]


@pytest.mark.slow
@needs_fmnist
def test_sigint_and_sigkill_in_every_stage_then_resume(tmp_path, monkeypatch):
    """For each stage of ``edgekd build`` in turn: SIGINT (Ctrl-C) in it, then SIGKILL in it, each just
    before one of its artifacts is renamed into place. Ctrl-C exits 130 with one line and leaves no
    temporary file; SIGKILL leaves the stage 'running'. Every rerun resumes (training stages from their
    last epoch, finished stages skipped) and the last one ends with a manifest whose every checksum
    matches. No secret from the environment appears in any output or file. (Ctrl-C and the reruns run
    in this process, each SIGKILL in a process of its own.)"""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    out = tmp_path / "run"
    extra = ["--set", "data.train_subset=600", "--set", "data.test_subset=200", "--set", "teacher.train.epochs=3",
             "--set", "student.train.epochs=3", "--set", "quantize.train.epochs=3"]  # 3: interrupted after epoch 2, one left to resume
    logs: list[str] = []

    def status(stage: str) -> str | None:
        return json.loads((out / "manifest.json").read_text())["stages"].get(stage, {}).get("status")

    done: list[str] = []
    for stage, mark, nth_int, nth_kill in _interrupt_points(out):
        r = _build_here(out, extra, (mark, nth_int))
        logs += [r.stdout, r.stderr]
        assert "interrupt_at: SIGINT" in r.stderr, f"{stage}: the signal point was never reached: {r.stderr[-2000:]}"
        assert r.returncode == 130, f"{stage}: {r.stderr[-2000:]}"
        assert "interrupted: rerun the same command to resume" in r.stderr and "Traceback" not in r.stderr, stage
        assert status(stage) == "running" and all(status(s) == "done" for s in done), stage
        assert not list(out.rglob("*.tmp")), f"{stage}: Ctrl-C left temporary files"
        if nth_kill is not None:
            r = _kill_build(out, extra, mark, nth_kill)
            logs += [r.stdout, r.stderr]
            assert r.returncode == -signal.SIGKILL, f"{stage}: {r.stderr[-2000:]}"
            assert status(stage) == "running" and all(status(s) == "done" for s in done), stage
        done.append(stage)
    assert list(out.rglob("*.tmp")), "the last SIGKILL (mid bundle write) should have left its temporary file"
    r = _build_here(out, extra)
    logs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [s for s, v in res["stages"].items() if v["status"] == "done"] == ["bundle"], res["stages"]
    for train_dir in ("teacher", "student", "qad"):
        assert json.loads((out / train_dir / "metrics.json").read_text())["resumed_from_epoch"] >= 1, train_dir
    assert Manifest(out).verify() == []
    assert not list(out.rglob("*.tmp")) and (out / "bundle.tar.gz").is_file()
    # secrets from the environment never reach the run directory, the bundle or the logs
    for text in logs:
        assert SECRET not in text and TOKEN not in text
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert SECRET.encode() not in data and TOKEN.encode() not in data, p
    assert "environ" not in json.loads((out / "manifest.json").read_text())


def test_a_second_build_in_the_same_folder_is_refused_while_one_runs(tmp_path):
    from edgekd.manifest import run_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from edgekd.manifest import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_inprocess("build", "--target", "x86-cpu", "--out", str(tmp_path), "--quick")
        assert_one_line_error(r, "another edgekd run is writing into")
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # released by the kernel when its holder died
        pass


@needs_fmnist
def test_training_commands_hold_their_output_folder_and_clean_up_after_a_kill(tmp_path):
    from edgekd.manifest import run_lock

    out = tmp_path / "ft"
    stale = out / ".last.pt.abc123.tmp"
    out.mkdir()
    stale.write_bytes(b"half a checkpoint from a SIGKILLed run")
    with run_lock(out):  # as if another finetune were writing there
        assert_one_line_error(run_inprocess("finetune", "--model", "pico_cnn", *TINY_FT, "--epochs", "1", "--out", out), "another edgekd run is writing into")
    assert stale.exists()
    json_out(run_inprocess("finetune", "--model", "pico_cnn", *TINY_FT, "--epochs", "1", "--out", out, "--json"))
    assert not stale.exists() and (out / "best.pt").is_file()


def test_export_holds_its_output_folder(tmp_path):
    """Two exports into one folder would each write whole files, with no telling which one wins."""
    from edgekd.manifest import run_lock

    out, ckpt = tmp_path / "export", tmp_path / "student.pt"
    ckpt.write_bytes(b"never read: the folder is refused first")
    with run_lock(out):
        assert_one_line_error(run_inprocess("export", str(ckpt), "--target", "x86-cpu", "--out", out), "another edgekd run is writing into")
    assert [p.name for p in out.iterdir()] == [".edgekd.lock"]


def test_artifacts_get_the_usual_file_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert (p.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        q = write_json_atomic(tmp_path / "b.json", {"x": 1})
        assert (q.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- resume traps in the training loop
TINY_FT = ["--pretrained", "none", "--input-size", "28", "--train-subset", "256", "--test-subset", "64", "--batch-size", "64"]


@needs_fmnist
def test_last_checkpoint_of_another_model_in_the_folder_is_one_line(tmp_path):
    out = tmp_path / "ft"
    json_out(run_inprocess("finetune", "--model", "pico_cnn", *TINY_FT, "--epochs", "1", "--out", out, "--json"))
    r = run_inprocess("finetune", "--model", "nano_cnn", *TINY_FT, "--epochs", "1", "--out", out)
    assert_one_line_error(r, "holds weights of another model")
    assert "--no-resume" in r.stderr
    # the way out it names works, and replaces the other model's checkpoints
    res = json_out(run_inprocess("finetune", "--model", "nano_cnn", *TINY_FT, "--epochs", "1", "--no-resume", "--out", out, "--json"))
    assert torch.load(out / "best.pt", weights_only=True)["model"]["name"] == "nano_cnn", res


@needs_fmnist
def test_zero_epochs_never_returns_a_stale_best_checkpoint(tmp_path):
    out = tmp_path / "ft"
    json_out(run_inprocess("finetune", "--model", "pico_cnn", *TINY_FT, "--epochs", "2", "--out", out, "--json"))
    trained = torch.load(out / "best.pt", weights_only=True)["state_dict"]
    json_out(run_inprocess("finetune", "--model", "pico_cnn", *TINY_FT, "--epochs", "0", "--no-resume", "--out", out, "--json"))
    fresh = torch.load(out / "best.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained), "--epochs 0 returned the earlier run's best.pt"


# ----------------------------------------------------------------------------- reproducibility
@needs_fmnist
def test_same_recipe_and_seed_give_the_same_metrics(tmp_path):
    """deterministic: true on CPU: two builds up to the distilled student agree exactly (metrics and weights)."""
    args = ["--set", "deterministic=true", "--set", "seed=7", "--set", "data.train_subset=400", "--set", "data.test_subset=200",
            "--set", "teacher.train.epochs=1", "--set", "student.train.epochs=1", "--until", "distill", "--json"]
    runs = [json_out(run_cli("build", "--target", "x86-cpu", *PICO, *args, "--out", tmp_path / f"r{i}", env=ENV)) for i in (1, 2)]
    for stage in ("teacher", "student"):
        a, b = (json.loads((tmp_path / f"r{i}" / stage / "metrics.json").read_text()) for i in (1, 2))
        for key in ("val", "test"):
            assert a[key] == b[key], (stage, key)
        assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
        wa, wb = (torch.load(tmp_path / f"r{i}" / stage / "best.pt", weights_only=True)["state_dict"] for i in (1, 2))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert runs[0]["stages"].keys() == runs[1]["stages"].keys()


# ----------------------------------------------------------------------------- supply chain
def test_every_torch_load_in_edgekd_is_weights_only():
    calls = []
    for path in (ROOT / "edgekd").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start():i]))
    assert calls, "expected at least models.safe_torch_load"
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call.replace(" ", "")]
    assert unsafe == [], unsafe
    assert not any("pickle.load" in p.read_text() for p in (ROOT / "edgekd").rglob("*.py"))


def test_manifest_records_versions_and_config_never_the_environment(tmp_path):
    """The manifest holds exactly its fields (no field a copy of the environment could hide in) and the
    versions of the libraries actually installed; secrets in a real build's environment are checked end
    to end by test_sigint_and_sigkill_in_every_stage_then_resume."""
    from importlib import metadata

    import onnx

    m = Manifest(tmp_path)
    m.start("teacher", "h")
    m.save()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert set(data) == {"manifest_version", "created", "updated", "versions", "stages"}, set(data)
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["onnx"] == onnx.__version__
    assert data["versions"]["onnxruntime"] == metadata.version("onnxruntime")
    assert data["stages"]["teacher"]["config_hash"] == "h" and data["stages"]["teacher"]["status"] == "running"
