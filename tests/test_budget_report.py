"""Budgets that fit the data, early stopping, the time budget, the control, and the build report."""

import io
import json
import time

import pytest
import torch.nn as nn
from rich.console import Console

from cli_helpers import json_out, run_cli, run_inprocess
from edgekd import ui
from edgekd.config import TrainConfig, load_recipe, parse_duration
from edgekd.data import load_dataset
from edgekd.errors import EdgekdError
from edgekd.manifest import Manifest
from edgekd.models import create_model
from edgekd.pipeline import choose_student
from edgekd.pipeline.training import distill_teacher
from edgekd.report import accuracy_table, diff_half_width, latency_table, wilson
from edgekd.train import cross_entropy_loss, fit, fit_to_data, FitOptions, stop_reason
from needs import needs_fmnist



# ----------------------------------------------------------------------------- budgets
def test_a_small_data_set_gets_enough_steps_and_a_large_one_keeps_its_epochs():
    cfg = TrainConfig(epochs=1, batch_size=64, min_steps=300)
    small, why = fit_to_data(cfg, 258)
    assert (small.batch_size, small.epochs) == (32, 38) and "258 training images" in why  # 8 steps an epoch, 38 * 8 >= 300
    large, why = fit_to_data(cfg, 54_000)
    assert large == cfg and why is None  # 843 steps already
    tiny, _ = fit_to_data(TrainConfig(epochs=1, batch_size=64, min_steps=10_000, max_epochs=50), 5)
    assert tiny.batch_size == 1 and tiny.epochs == 50  # fewer images than one batch still trains, capped at max_epochs


def test_explicit_epochs_win_and_partial_overrides_keep_the_stage_defaults(tmp_path):
    default = load_recipe()
    assert default.teacher.train.min_steps == 300 and default.student.train.min_steps == 1000
    set_epochs = load_recipe(overrides=["student.train.epochs=3"])
    assert set_epochs.student.train.epochs == 3 and set_epochs.student.train.min_steps == 0
    assert set_epochs.teacher.train.min_steps == 300  # other stages keep theirs
    both = load_recipe(overrides=["student.train.epochs=3", "student.train.min_steps=50"])
    assert both.student.train.min_steps == 50
    lr_only = load_recipe(overrides=["teacher.train.lr=0.0003"])  # the teacher's own defaults stay, not a bare TrainConfig's (5 epochs, no min_steps)
    assert lr_only.teacher.train.model_dump() == {**default.teacher.train.model_dump(), "lr": 0.0003}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher:\n  train:\n    epochs: 4\n")
    assert load_recipe(recipe).teacher.train.min_steps == 0


def test_time_budget_parsing():
    assert parse_duration("20m") == 1200 and parse_duration("90s") == 90 and parse_duration("1.5h") == 5400 and parse_duration("45") == 45
    assert parse_duration("none") == 0 and parse_duration("0") == 0 and parse_duration("0m") == 0  # no budget, as time_budget_s documents
    for bad in ("soon", "-3m", "nan", "inf", "nanm"):
        with pytest.raises(EdgekdError, match="not a duration"):
            parse_duration(bad)


def test_stop_reason_plateau_time_and_loss_tie_break():
    cfg = TrainConfig(patience=2)
    h = [{"val_top1": 0.8, "val_loss": 0.5}, {"val_top1": 0.9, "val_loss": 0.4}, {"val_top1": 0.9, "val_loss": 0.45}]
    assert stop_reason(h, cfg, 1.0) is None  # one epoch since the best
    assert stop_reason(h + [{"val_top1": 0.85, "val_loss": 0.5}], cfg, 1.0) == "plateau"
    # same top-1, lower loss: still improving (a tiny validation set sits at 100%)
    flat = [{"val_top1": 1.0, "val_loss": v} for v in (0.3, 0.2, 0.1)]
    assert stop_reason(flat, cfg, 1.0) is None
    assert stop_reason(flat, TrainConfig(time_limit_s=5), 5.0) == "time"


@needs_fmnist
def test_fit_stops_on_a_plateau_and_on_its_time_limit(tmp_path):
    data = load_dataset("fashion-mnist", train_subset=400, test_subset=200)
    model = create_model("pico_cnn", 10, input_size=28)
    frozen = nn.Linear(1, 1)  # the optimiser updates only this and BN statistics are frozen: the model never changes, so validation cannot improve
    res = fit(model, data, TrainConfig(epochs=40, batch_size=64, patience=2, freeze_bn=True), tmp_path / "p", cross_entropy_loss(), model.preprocess, FitOptions(augment="none", trainable=frozen, resume=False))
    assert res.stopped == "plateau" and len(res.history) == 3
    model = create_model("pico_cnn", 10, input_size=28)
    t0 = time.time()
    cfg = TrainConfig(epochs=1000, batch_size=32, lr=0.01, warmup_epochs=0, time_limit_s=3.0)
    res = fit(model, data, cfg, tmp_path / "t", cross_entropy_loss(), model.preprocess, FitOptions(augment="none", resume=False))
    assert res.stopped == "time" and len(res.history) < 1000 and time.time() - t0 < 30
    assert res.history[-1]["lr"] < 0.2 * cfg.lr  # the schedule followed the clock down instead of stopping at its peak


# ----------------------------------------------------------------------------- the control and the report
def test_choose_student_ships_the_control_only_when_it_wins_on_validation():
    assert choose_student({"val_top1": 0.90}, {"val_top1": 0.91}, "better")[0] == "control"
    assert choose_student({"val_top1": 0.91}, {"val_top1": 0.91}, "better") == ("distilled", None)  # a tie keeps the distilled one
    assert choose_student({"val_top1": 0.90}, {"val_top1": 0.95}, "distilled") == ("distilled", None)
    assert choose_student({"val_top1": 0.90}, None, "better") == ("distilled", None)


def test_a_teacher_weaker_than_the_control_is_replaced_by_the_control():
    assert distill_teacher({"val_top1": 0.87}, {"val_top1": 0.92}, "control")[0] == "control"
    assert "born-again" in distill_teacher({"val_top1": 0.87}, {"val_top1": 0.92}, "control")[1]
    assert distill_teacher({"val_top1": 0.92}, {"val_top1": 0.92}, "control") == ("teacher", None)  # as good: keep the teacher
    assert distill_teacher({"val_top1": 0.87}, {"val_top1": 0.92}, "keep") == ("teacher", None)
    assert distill_teacher({"val_top1": 0.87}, None, "control") == ("teacher", None)  # --no-control: nothing to compare with
    assert distill_teacher({"provided": True}, {"val_top1": 0.92}, "control") == ("teacher", None)  # a --teacher checkpoint: not measured here


@needs_fmnist
def test_build_distils_from_the_control_when_the_teacher_is_weaker(tmp_path):
    """An untrained teacher: the build distils from the control (born-again) and says so."""
    weak = ["teacher.model=pico_cnn", "teacher.pretrained=none", "teacher.input_size=28", "teacher.train.epochs=0", "student.model=pico_cnn",
            "student.train.epochs=1", "data.train_subset=600", "data.test_subset=200"]
    json_out(run_inprocess("build", "--target", "x86-cpu", *[x for s in weak for x in ("--set", s)], "--until", "distill", "--out", tmp_path / "run", "--json"))
    distill = Manifest(tmp_path / "run").stage("distill")
    assert distill["metrics"]["distilled_from"] == "control" and "born-again" in distill["metrics"]["distilled_from_reason"]
    assert distill["artifacts"]["kd_teacher"]["path"] == "control/best.pt"


def test_a_validation_set_too_small_to_choose_is_said():
    from edgekd.report import notes

    close = notes({"distill": {"val_top1": 0.93, "val_n": 30}, "control": {"val_top1": 0.9}}, 72)
    assert any("within noise" in n for n in close) and any("72 images" in n for n in close)
    clear = notes({"distill": {"val_top1": 0.93, "val_n": 6000}, "control": {"val_top1": 0.9}}, 10_000)
    assert not any("within noise" in n for n in clear) and not any("images: one image" in n for n in clear)


def test_intervals():
    lo, hi = wilson(0.9, 100)
    assert abs(lo - 0.8256) < 1e-3 and abs(hi - 0.9448) < 1e-3  # the textbook Wilson interval
    assert wilson(1.0, 30)[1] == 1.0 and wilson(1.0, 30)[0] < 0.9
    assert abs(diff_half_width(0.9, 0.9, 10_000) - 1.96 * (2 * 0.09 / 10_000) ** 0.5) < 1e-9


# A build whose distillation must lose: a teacher that never trained, and all the weight on its soft targets.
LOSING = [
    "--set", "teacher.model=pico_cnn", "--set", "teacher.pretrained=none", "--set", "teacher.input_size=28", "--set", "teacher.train.epochs=0",
    "--set", "student.model=pico_cnn", "--set", "student.train.epochs=3", "--set", "distill.alpha=1.0", "--set", "distill.temperature=1.0",
    "--set", "distill.weak_teacher=keep", "--set", "data.train_subset=1500", "--set", "data.test_subset=500", "--set", "quantize.train.epochs=1",
    "--set", "quantize.calib_images=128", "--set", "bench.runs=20", "--set", "bench.warmup=2", "--set", "bench.batches=[1,8]",
    "--set", "export.check_batch=128",
]


@pytest.fixture(scope="module")
def losing_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("losing") / "run"
    # as a CI log sees it: not a terminal, 80 columns, a heartbeat every second
    proc = run_cli("build", "--target", "x86-cpu", *LOSING, "--out", out, "--json",
                   env={"OMP_NUM_THREADS": "1", "EDGEKD_QUIET": "0", "COLUMNS": "80", "EDGEKD_HEARTBEAT_S": "1"})
    return out, json_out(proc), proc.stderr


@needs_fmnist
def test_the_control_ships_when_distillation_loses(losing_build):
    out, res, _ = losing_build
    distill = Manifest(out).stage("distill")
    assert distill["metrics"]["shipped_student"] == "control" and "lost to the student alone" in distill["metrics"]["ship_reason"]
    assert distill["artifacts"]["shipped_checkpoint"]["path"] == "control/best.pt"
    qad_source = json.loads((out / "qad" / "metrics.json").read_text())
    assert qad_source["val"]["top1"] > 0.5  # QAD started from the control, not from the student taught by noise
    steps = [r["step"] for r in res["report"]["accuracy"]]
    assert steps[:3] == ["teacher pico_cnn", "student alone (control)", "distilled student"] and steps[-1].startswith("exported")
    assert "control ships" in res["report"]["verdict"]
    rows = {r["step"]: r for r in res["report"]["accuracy"]}
    assert rows["distilled student"]["change"] < 0  # measured against the control, with its interval
    assert rows["distilled student"]["change_ci95"] > 0


@needs_fmnist
def test_report_files_are_in_the_run_folder_and_the_bundle(losing_build):
    out, res, _ = losing_build
    for name in ("report.md", "report.png", "report.json"):
        assert (out / "report" / name).is_file() and (out / "bundle" / "report" / name).is_file(), name
    assert (out / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report" / "report.md").read_text()
    assert "**Verdict:**" in md and "| student alone (control) |" in md and "Next:" in md
    sums = (out / "bundle" / "SHA256SUMS").read_text()
    assert "report/report.md" in sums and "report/report.png" in sums


@needs_fmnist
def test_the_summary_fits_80_columns_and_a_ci_log_gets_progress_lines(losing_build):
    _, res, stderr = losing_build
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(accuracy_table(res["report"]))
    console.print(latency_table(res["report"]))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    # the real CLI output, COLUMNS=80: every table line fits, nothing is cut; a message line is never
    # hard-wrapped (a path split in two cannot be grepped), the terminal wraps it if it must
    boxed = [line for line in stderr.splitlines() if any(ch in line for ch in "│┃┏┗┡└┌")]
    assert boxed and "…" not in stderr and max(len(line) for line in boxed) <= 80
    assert "verdict" in stderr and "next:" in stderr and "{'" not in stderr  # numbers, no raw dicts
    assert "running for" in stderr  # the non-TTY heartbeat
    assert "Inserted" not in stderr  # modelopt's prints stay out


def test_heartbeat_prints_at_least_every_interval(monkeypatch):
    lines = []
    monkeypatch.setattr(ui, "HEARTBEAT_S", 0.3)
    monkeypatch.setattr(ui.console, "print", lambda msg, *a, **k: lines.append((time.time(), str(msg))))
    monkeypatch.setattr(type(ui.console), "is_terminal", property(lambda self: False))
    monkeypatch.setattr(ui, "is_quiet", lambda: False)
    with ui.heartbeat("stage"):
        time.sleep(1.6)
    stamps = [t for t, msg in lines if "stage: running for" in msg]
    assert len(stamps) >= 3 and max(b - a for a, b in zip(stamps, stamps[1:])) < 0.3 + 0.2
