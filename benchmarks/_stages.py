"""The training benchmarks' calls into edgekd's stages (QAD and export of one checkpoint, no resume), kept here once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgekd.config import DataConfig, ExportConfig, QuantizeConfig
from edgekd.data import DataSet
from edgekd.export import ExportJob, confirm_on_export, run_export
from edgekd.quantize import QadJob, for_target, run_qad
from edgekd.stage_context import StageContext
from edgekd.targets import host_arch


def qad_run(ckpt: str | Path, qcfg: QuantizeConfig, data: DataSet, out: Path, make_loss: Callable, seed: int, augment: str = "flip") -> dict[str, Any]:
    """``run_qad`` of ``ckpt`` with ``qcfg`` (its layout; weight bits for this machine), from scratch."""
    job = QadJob(for_target(qcfg, qcfg.layout, host_arch()), Path(ckpt), make_loss, confirm_on_export)
    return run_qad(job, data, out, StageContext(seed=seed, resume=False, data_cfg=DataConfig(augment=augment)))


def export_run(ckpt: str | Path, out: Path, data: DataSet, export_cfg: ExportConfig, qcfg: QuantizeConfig, seed: int, target: str | None = None) -> dict[str, Any]:
    """``run_export`` of ``ckpt``."""
    return run_export(ExportJob(export_cfg, qcfg, Path(ckpt)), data, out, StageContext(seed=seed, target=target))
