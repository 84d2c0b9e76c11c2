"""How every training and export stage is run: ``run_<stage>(job, data, out, ctx)``.

``job`` is the stage's own config section (with its input files where it has some: the teachers
of a distillation, the checkpoint QAD or export starts from), ``data`` the loaded
:class:`~edgekd.data.DataSet`, ``out`` its output folder, and ``ctx`` this :class:`StageContext`:
what is the same for every stage of one run. Typed, so a caller sees every valid field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgekd.config import DataConfig


@dataclass(frozen=True)
class StageContext:
    seed: int = 0
    deterministic: bool = False
    resume: bool = True  # continue from ``last.pt`` in the output folder when it is there
    data_cfg: DataConfig = field(default_factory=DataConfig)  # how the data was loaded, and this stage's augmentation; recorded in checkpoints
    cache_dir: Path | None = None  # where teacher outputs are cached (distill, qad); None: edgekd.distill.cache.default_cache_dir()
    target: str | None = None  # the deployment target's name (export); None: this machine

    @property
    def augment(self) -> str:
        return self.data_cfg.augment

