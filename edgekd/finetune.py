"""The teacher stage: fine-tune a pretrained backbone into the teacher (transfer learning).

Two modes: ``full`` (every weight trains; best accuracy; ``frozen_stages`` keeps the stem and the
first stages as pretrained, for cheaper steps) and ``linear-probe`` (the backbone is frozen, only
the new classifier head trains; minutes instead of hours, and a sanity check that the pretrained
features are real); ``progressive`` unfreezes the backbone stage by stage from the top
(gradual unfreezing, :mod:`edgekd.transfer`). With unlabeled deployment-domain images,
``teacher.mmd`` aligns the teacher's features on both domains.
"""

from __future__ import annotations

from pathlib import Path

from edgekd import ui
from edgekd.config import DataConfig, TeacherConfig
from edgekd.data import DataSet, load_dataset
from edgekd.data.store import Storage
from edgekd.data.unlabeled import load_target_test, load_unlabeled
from edgekd.models import count_params, create_model, load_checkpoint, model_from_checkpoint, set_trainable
from edgekd.train import final_metrics, fit, seed_everything
from edgekd.transfer import GradualUnfreezing, planned_steps, teacher_loss


def load_data(cfg: DataConfig, seed: int, store_size: int = 64) -> DataSet:
    """The recipe's data set; an image folder stored at ``store_size`` px as ``cfg`` says (decoded once, cached).
    The deployment-domain folders (``unlabeled_root``, ``target_test_root``) are stored like the
    labeled images: an image folder's side, or the side of a data set's own images (28 px for
    Fashion-MNIST), and its channels."""
    storage = Storage(store_size, cfg.resize, cfg.cache_dir, cfg.decode_workers)
    data = load_dataset(cfg.dataset, cfg.root, cfg.val_fraction, seed, cfg.train_subset, cfg.test_subset, storage, cfg.test_fraction)
    if cfg.unlabeled_root or cfg.target_test_root:
        side = storage if cfg.dataset == "imagefolder" else Storage(data.train.image_shape[-1], cfg.resize, cfg.cache_dir, cfg.decode_workers)
        if cfg.unlabeled_root:
            data.unlabeled = load_unlabeled(cfg.unlabeled_root, side, data.channels)
        if cfg.target_test_root:
            data.target_test = load_target_test(cfg.target_test_root, data.classes, side, data.channels)
        ui.log(f"deployment domain: {len(data.unlabeled) if data.unlabeled is not None else 0:,} unlabeled images, "
               f"{len(data.target_test) if data.target_test is not None else 0:,} labeled target test images")
    return data


def run_finetune(cfg: TeacherConfig, data_cfg: DataConfig, out_dir: str | Path, seed: int = 0, deterministic: bool = False, resume: bool = True, data: DataSet | None = None) -> dict:
    """Train the teacher; writes ``best.pt``, ``last.pt`` and ``metrics.json`` into ``out_dir``."""
    seed_everything(seed, deterministic)
    data = data or load_data(data_cfg, seed, store_size=max(64, cfg.input_size) if data_cfg.dataset == "imagefolder" else 64)
    model = create_model(cfg.model, data.num_classes, pretrained=cfg.pretrained, input_size=cfg.input_size)
    trainable = set_trainable(model, cfg.mode, cfg.frozen_stages)  # frozen_stages applies to modes full and progressive
    if cfg.mode == "linear-probe" and not cfg.train.freeze_bn:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"freeze_bn": True})})  # a frozen backbone keeps its BN statistics too
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unfreeze = GradualUnfreezing(model, planned_steps(cfg.train, len(data.train)), cfg.train.time_limit_s, frozen) if cfg.mode == "progressive" else None
    ui.log(f"teacher {cfg.model}: {count_params(model):,} params ({trainable:,} trainable, {cfg.mode}), weights {model.weights_source}, "
           f"data {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test")
    extra = {"config": {"teacher": cfg.model_dump(), "data": data_cfg.model_dump(), "seed": seed}, "weights_source": model.weights_source}
    loss_fn, hook = teacher_loss(model, cfg, data, unfreeze)
    try:
        result = fit(model, data, cfg.train, out_dir, loss_fn, model.preprocess,
                     augment=data_cfg.augment, seed=seed, kind="teacher", resume=resume, ckpt_extra=extra, description=f"fine-tune {cfg.model}")
    finally:
        if hook is not None:
            hook.remove()
    best = model_from_checkpoint(load_checkpoint(result.best_path))
    metrics = final_metrics(best, data, best.preprocess, result, {"params": count_params(best), "model": cfg.model, "mode": cfg.mode, "weights_source": model.weights_source,
                                                                  "unfreezing": unfreeze.history if unfreeze else None})
    return {"checkpoint": str(result.best_path), "last": str(result.last_path), "metrics_file": str(result.metrics_path), "metrics": metrics}
