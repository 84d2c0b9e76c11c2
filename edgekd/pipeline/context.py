"""What every stage of a build shares: the recipe, the run folder, the manifest, the data
loaded once, and the time budget shared out over the training stages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd.config import Recipe
from edgekd.errors import EdgekdError
from edgekd.data import load_data
from edgekd.manifest import Manifest
from edgekd.stage_context import StageContext
from edgekd.time_budget import DEFAULT_TIME_BUDGET_S, TIME_RESERVE, TIME_SHARES




# The one declaration of what each stage reads from the stages before it: (stage, artifact) pairs.
# Their checksums are part of the stage's identity (an input that changed reruns it), and a stage
# can read no other artifact (BuildContext.path refuses it), so the two cannot drift apart.
STAGE_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "distill": (("teacher", "checkpoint"), ("control", "checkpoint")),
    "qad": (("distill", "kd_teacher"), ("distill", "shipped_checkpoint")),
    "export": (("qad", "checkpoint"), ("distill", "shipped_checkpoint")),
    "evaluate": (("distill", "checkpoint"), ("export", "onnx"), ("export", "fp32_onnx")),
    "bench": (("export", "onnx"), ("export", "fp32_onnx")),
    "report": (("evaluate", "record"), ("bench", "record")),
    "bundle": (("distill", "shipped_checkpoint"), ("qad", "sensitivity_json"), ("qad", "sensitivity_png"), ("export", "onnx"), ("export", "fp32_onnx"),
               ("evaluate", "record"), ("bench", "record"), ("report", "json"), ("report", "md"), ("report", "png")),
}


@dataclass
class BuildContext:
    recipe: Recipe
    out: Path
    target: Any  # edgekd.targets.Target
    manifest: Manifest
    teacher_checkpoint: Path | None = None
    _data: Any = None
    started: float = field(default_factory=time.time)
    order: list[str] = field(default_factory=list)
    stage_limit: float | None = None  # the running stage's time limit, set by run_stage
    running: str | None = None  # the stage running now, set by run_stage: it may read only its STAGE_INPUTS

    def time_limit(self, stage: str) -> float | None:
        """This training stage's share of what is left of the build's time budget (None: no limit).
        The default budget applies only to stages whose length edgekd sizes (``min_steps`` > 0):
        a recipe's explicit epochs are not cut unless it also sets a budget."""
        explicit = self.recipe.time_budget_s is not None
        budget = self.recipe.time_budget_s if explicit else DEFAULT_TIME_BUDGET_S
        if not budget or stage not in TIME_SHARES or (not explicit and self.train_config(stage).min_steps == 0):
            return None
        pending = [s for s in self.order[self.order.index(stage):] if s in TIME_SHARES]
        left = budget - (time.time() - self.started)
        share = TIME_SHARES[stage] / (sum(TIME_SHARES[s] for s in pending) + TIME_RESERVE)
        return round(max(10.0, left * share), 1)

    def stage_context(self, augment: str | None = None) -> StageContext:
        """What every stage of this build runs with: the recipe's seed and data (``augment``: the
        stage's own), resuming, the run folder's teacher-output cache, the target."""
        rc = self.recipe
        data_cfg = rc.data if augment is None else rc.data.model_copy(update={"augment": augment})
        return StageContext(rc.seed, rc.deterministic, True, data_cfg, self.out / "cache", self.target.name)

    def train_config(self, stage: str):
        rc = self.recipe
        return {"teacher": rc.teacher.train, "control": rc.student.train, "distill": rc.student.train, "qad": rc.quantize.train}[stage]

    def limited(self, train):
        """``train`` (a TrainConfig) with the running stage's time limit, when the build has a budget."""
        return train if self.stage_limit is None else train.model_copy(update={"time_limit_s": self.stage_limit})

    @property
    def data(self):
        """The dataset, loaded once and shared by every stage that needs it."""
        if self._data is None:
            self._data = load_data(self.recipe.data, self.recipe.seed, store_size=self.store_size)
        return self._data

    @property
    def store_size(self) -> int:
        """The side an image folder is stored at (decoded once): the teacher's input, at least 64 px."""
        return max(64, self.recipe.teacher.input_size)

    def device_preprocess(self, pre: dict) -> dict:
        """A checkpoint's preprocessing plus how an image folder's pictures were made square, so the
        bundle's runtime brings a photo to the same pixels the build trained and measured on."""
        if self.recipe.data.dataset.lower() != "imagefolder":
            return dict(pre)  # Fashion-MNIST and torchvision sets are stored as they come (square already)
        return {**pre, "store_size": self.store_size, "resize": self.recipe.data.resize}

    def path(self, stage: str, key: str) -> Path:
        """An earlier stage's artifact, for the running stage: only one of its declared inputs."""
        if self.running is not None and (stage, key) not in STAGE_INPUTS.get(self.running, ()):
            raise EdgekdError(f"internal: stage {self.running} reads {stage}.{key}, which is not among its inputs in pipeline.context.STAGE_INPUTS",
                              "report this as an edgekd bug")
        return self.manifest.artifact_path(stage, key)

    def sha(self, stage: str, key: str) -> str:
        return self.manifest.stage(stage)["artifacts"][key]["sha256"]
