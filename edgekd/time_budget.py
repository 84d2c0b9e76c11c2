"""How a build's wall-time budget is shared out over its training stages (stdlib only: the CLI's
``--time-budget`` help reads it without importing the pipeline)."""

from __future__ import annotations

DEFAULT_TIME_BUDGET_S = 20 * 60  # for the stages whose length edgekd sizes itself, unless the recipe sets time_budget_s
# Shares of what is left of the budget when each training stage starts. Control and distill get the
# same share (the control is the student alone *with the same budget*); distill's share also pays for
# its teacher-output cache, which is part of what distillation costs.
TIME_SHARES = {"teacher": 0.25, "control": 0.3, "distill": 0.3, "qad": 0.07}
TIME_RESERVE = 0.08  # export, evaluate, bench, report, bundle: ~30 s of the default build's 20 min


def shares_text() -> str:
    """The shares as the help shows them, e.g. 'teacher 0.25, control 0.3, distill 0.3, qad 0.07 of
    what is left when each starts, over the sum of the stages still to run plus 0.08 for the rest'."""
    parts = ", ".join(f"{stage} {share:g}" for stage, share in TIME_SHARES.items())
    return f"weights {parts}, and {TIME_RESERVE:g} kept for export, evaluate, bench, report and bundle"
