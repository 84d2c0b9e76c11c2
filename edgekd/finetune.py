"""The teacher stage: fine-tune a pretrained backbone into the teacher (transfer learning).

Two modes: ``full`` (every weight trains; best accuracy; ``frozen_stages`` keeps the stem and the
first stages as pretrained, for cheaper steps) and ``linear-probe`` (the backbone is frozen, only
the new classifier head trains; minutes instead of hours, and a sanity check that the pretrained
features are real).
"""

from __future__ import annotations

from pathlib import Path

from edgekd import ui
from edgekd.config import DataConfig, TeacherConfig
from edgekd.data import DataSet, load_dataset
from edgekd.data.store import Storage
from edgekd.models import count_params, create_model, load_checkpoint, model_from_checkpoint, set_trainable
from edgekd.train import cross_entropy_loss, final_metrics, fit, seed_everything


def load_data(cfg: DataConfig, seed: int, store_size: int = 64) -> DataSet:
    """The recipe's data set; an image folder stored at ``store_size`` px as ``cfg`` says (decoded once, cached)."""
    storage = Storage(store_size, cfg.resize, cfg.cache_dir, cfg.decode_workers)
    return load_dataset(cfg.dataset, cfg.root, cfg.val_fraction, seed, cfg.train_subset, cfg.test_subset, storage, cfg.test_fraction)


def run_finetune(cfg: TeacherConfig, data_cfg: DataConfig, out_dir: str | Path, seed: int = 0, deterministic: bool = False, resume: bool = True, data: DataSet | None = None) -> dict:
    """Train the teacher; writes ``best.pt``, ``last.pt`` and ``metrics.json`` into ``out_dir``."""
    seed_everything(seed, deterministic)
    data = data or load_data(data_cfg, seed, store_size=max(64, cfg.input_size) if data_cfg.dataset == "imagefolder" else 64)
    model = create_model(cfg.model, data.num_classes, pretrained=cfg.pretrained, input_size=cfg.input_size)
    trainable = set_trainable(model, cfg.mode, cfg.frozen_stages)  # frozen_stages applies to mode full only
    if cfg.mode == "linear-probe" and not cfg.train.freeze_bn:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"freeze_bn": True})})  # a frozen backbone keeps its BN statistics too
    ui.log(f"teacher {cfg.model}: {count_params(model):,} params ({trainable:,} trainable, {cfg.mode}), weights {model.weights_source}, "
           f"data {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test")
    extra = {"config": {"teacher": cfg.model_dump(), "data": data_cfg.model_dump(), "seed": seed}, "weights_source": model.weights_source}
    result = fit(model, data, cfg.train, out_dir, cross_entropy_loss(cfg.train.label_smoothing), model.preprocess,
                 augment=data_cfg.augment, seed=seed, kind="teacher", resume=resume, ckpt_extra=extra, description=f"fine-tune {cfg.model}")
    best = model_from_checkpoint(load_checkpoint(result.best_path))
    metrics = final_metrics(best, data, best.preprocess, result, {"params": count_params(best), "model": cfg.model, "mode": cfg.mode, "weights_source": model.weights_source})
    return {"checkpoint": str(result.best_path), "last": str(result.last_path), "metrics_file": str(result.metrics_path), "metrics": metrics}
