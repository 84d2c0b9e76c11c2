"""`edgekd build`: the only module that knows the stage order.

    teacher (finetune) -> control (the student alone) -> distill (FP32 student; ships the better of
    distilled and control) -> qad (INT8 fake-quant + KD) -> export (ONNX per target layout, checks)
    -> evaluate (accuracy of the exported file) -> bench (latency here) -> report (what each stage
    bought: table, report.md, report.png) -> bundle (folder + .tar.gz for the device)

With a time budget (``--time-budget 20m``) the training stages share it out (:data:`edgekd.time_budget.TIME_SHARES`):
each gets its share of what is left when it starts, and reports what it used.

Stages pass artifacts as files recorded in ``<out>/manifest.json`` with their sha256. A stage is
skipped when its config and the checksums of its inputs are unchanged and its outputs are intact;
an interrupted stage reruns, and training stages resume from their own ``last.pt``. So running
``build`` twice does no work the second time, and killing it mid-stage loses at most one epoch.

Modules: ``context`` (BuildContext, time shares), ``training`` and ``delivery`` (the stage
functions), ``run`` (order, skip-if-unchanged, the loop), ``summary`` (the result).
"""

from edgekd.pipeline.delivery import onnx_test_accuracy
from edgekd.pipeline.run import QUICK_OVERRIDES, STAGES, build
from edgekd.pipeline.training import choose_student

__all__ = ["QUICK_OVERRIDES", "STAGES", "build", "choose_student", "onnx_test_accuracy"]
