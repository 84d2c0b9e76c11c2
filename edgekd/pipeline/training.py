"""The training stages of a build: teacher (fine-tune), control (the student alone), distill
(ships the better of distilled and control) and qad (INT8 fake-quant + KD)."""

from __future__ import annotations

from edgekd import ui
from edgekd.atomic import write_bytes_atomic
from edgekd.control import run_control
from edgekd.distill import DistillJob, build_distill_loss, load_teacher, run_distill_mode
from edgekd.export import confirm_on_export
from edgekd.finetune import run_finetune
from edgekd.models import load_checkpoint
from edgekd.pipeline.context import BuildContext
from edgekd.quantize import QadJob, for_target, run_qad
from edgekd.train.env import on_main


def stage_teacher(ctx: BuildContext) -> tuple[dict, dict]:
    if ctx.teacher_checkpoint is not None:
        ck = load_checkpoint(ctx.teacher_checkpoint)  # validates it before anything builds on it
        # A copy inside the run folder: the manifest only records (and trusts) files under --out.
        copy = on_main(lambda: write_bytes_atomic(ctx.out / "teacher" / "provided.pt", ctx.teacher_checkpoint.read_bytes()))
        return {"checkpoint": copy}, {"provided": True, "model": ck["model"]["name"], "source": str(ctx.teacher_checkpoint)}
    cfg = ctx.recipe.teacher.model_copy(update={"train": ctx.limited(ctx.recipe.teacher.train)})
    r = run_finetune(cfg, ctx.data, ctx.out / "teacher", ctx.stage_context())
    return {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"]}, {**training_metrics(r["metrics"]), "model": cfg.model}


def training_metrics(m: dict) -> dict:
    """What the manifest keeps of a training stage's metrics.json."""
    return {"val_top1": m["val"]["top1"], "val_n": m["val"].get("n"), "test_top1": m["test"]["top1"], "target_top1": (m.get("target_test") or {}).get("top1"),
            "target_n": (m.get("target_test") or {}).get("n"), "params": m.get("params"),
            "train_seconds": m["train_seconds"], "stopped": m.get("stopped"), "plan": m.get("plan")}


def stage_control(ctx: BuildContext) -> tuple[dict, dict]:
    """The student alone on hard labels, same budget: what distillation has to beat."""
    rc = ctx.recipe
    student = rc.student.model_copy(update={"train": ctx.limited(rc.student.train)})
    r = run_control(student, ctx.data, ctx.out / "control", ctx.stage_context(rc.student.augment))
    return {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"]}, training_metrics(r["metrics"])


def choose_student(distilled: dict, control: dict | None, rule: str) -> tuple[str, str | None]:
    """("distilled" | "control", why): the control ships only when it beat distillation on
    validation and the recipe allows it (``distill.ship: better``)."""
    if control is None or control.get("val_top1") is None or rule != "better":
        return "distilled", None
    if control["val_top1"] > distilled["val_top1"]:
        return "control", (f"distillation lost to the student alone on validation ({100 * distilled['val_top1']:.2f}% vs "
                           f"{100 * control['val_top1']:.2f}%): the control ships (distill.ship=distilled ships the distilled one)")
    return "distilled", None


def distill_teacher(teacher: dict, control: dict | None, rule: str) -> tuple[str, str | None]:
    """("teacher" | "control", why): which model the student learns from. A fine-tuned teacher
    that validates below the student trained alone pulls the student down (measured: -1.2 points
    on the default build), so with ``distill.weak_teacher: control`` the student distils from the
    control instead: born-again distillation (Furlanello et al. 2018, "Born-Again Neural Networks")."""
    if rule != "control" or control is None or control.get("val_top1") is None or teacher.get("val_top1") is None:
        return "teacher", None
    if teacher["val_top1"] >= control["val_top1"]:
        return "teacher", None
    return "control", (f"the teacher validates below the student alone ({100 * teacher['val_top1']:.2f}% vs {100 * control['val_top1']:.2f}%): "
                       "the student distils from the control instead (born-again; distill.weak_teacher=keep uses the teacher)")


def stage_distill(ctx: BuildContext) -> tuple[dict, dict]:
    rc = ctx.recipe
    student = rc.student.model_copy(update={"train": ctx.limited(rc.student.train)})
    control = ctx.manifest.stage("control")["metrics"] if "control" in ctx.order else None
    adapting = adapts_to_target(rc)
    rule = rc.distill.weak_teacher if rc.distill.mode == "teacher" and not adapting else "keep"
    source, source_why = distill_teacher(ctx.manifest.stage("teacher")["metrics"], control, rule)
    if source_why:
        ui.warn(source_why)
    kd_teacher = ctx.path(source, "checkpoint")
    job = DistillJob(student, rc.distill, (kd_teacher,), self_distill=source == "control")
    r = run_distill_mode(job, ctx.data, ctx.out / "student", ctx.stage_context(rc.student.augment))
    m = r["metrics"]
    metrics = {**training_metrics(m), "teacher_weaker_than_student": m.get("teacher_weaker_than_student"), "distilled_from": source,
               "distilled_from_reason": source_why, "mode": rc.distill.mode, "assistant": m.get("assistant"), "peers": m.get("peers")}
    shipped, why = choose_student(metrics, control, rc.distill.ship if not adapting else "distilled")
    if adapting and control is not None:
        why = ("the distilled student ships: it learned from unlabeled deployment-domain images, and the control "
                                        "(source only) cannot be judged against it on source validation")
    if why:
        (ui.log if adapting else ui.warn)(why)
    chosen = r["checkpoint"] if shipped == "distilled" else ctx.path("control", "checkpoint")
    artifacts = {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"], "shipped_checkpoint": chosen, "kd_teacher": kd_teacher}
    return artifacts, {**metrics, "shipped_student": shipped, "ship_reason": why}


def adapts_to_target(rc) -> bool:
    """Whether distillation uses unlabeled deployment-domain images (then source validation alone
    cannot choose between the adapted student and the source-only control, nor between teachers)."""
    return bool(rc.data.unlabeled_root) and (rc.distill.unlabeled_weight > 0 or rc.distill.mmd.weight > 0)


def stage_qad(ctx: BuildContext) -> tuple[dict, dict]:
    """Quantization-aware distillation: the INT8 fake-quant student keeps learning from the FP32
    model the distill stage learned from (the teacher, or the control when the teacher was weaker)."""
    rc = ctx.recipe
    teacher = load_teacher(ctx.path("distill", "kd_teacher"))
    augment = rc.student.augment

    def make_loss(qstudent):
        return build_distill_loss(qstudent, [teacher], rc.distill, ctx.data, ctx.out / "cache", augment)

    cfg = for_target(rc.quantize, ctx.target.layout, ctx.target.arch)
    cfg = cfg.model_copy(update={"train": ctx.limited(cfg.train)})
    job = QadJob(cfg, ctx.path("distill", "shipped_checkpoint"), make_loss, confirm_on_export)
    r = run_qad(job, ctx.data, ctx.out / "qad", ctx.stage_context(augment))
    m = r["metrics"]
    artifacts = {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"]}
    for name in ("sensitivity.json", "sensitivity.png"):
        if (ctx.out / "qad" / name).is_file():
            artifacts[name.replace(".", "_")] = ctx.out / "qad" / name
    budget = {k: v for k, v in (m.get("accuracy_budget") or {}).items() if k not in ("search_steps",)} or None
    return artifacts, {**training_metrics(m), "fp32_val_top1": m.get("fp32_val_top1"), "ptq_val_top1": m.get("ptq_val_top1"),
                       "ptq_test_top1": m.get("ptq_test_top1"), "ptq_target_top1": m.get("ptq_target_top1"), "result": m.get("result"), "float_layers": m.get("float_layers", []),
                       "full_int8_test_top1": m.get("full_int8_test_top1"), "accuracy_budget": budget}
