"""One planner per merge mode, keyed by `Mode` (`PLANNERS`, `planner_for`).

A planner (`base.Planner`) says which settings its mode takes and what it needs (a base
checkpoint, calibration data, a budget), and plans each MoE layer's bank:

    grouped.py     lossless, threshold, budget: experts grouped by their weights alone
    calibrated.py  calibrated: by each model's own activations, with corrections (--deltas)
    reference.py   reference: the reference system's same-index sharing
    merged.py      average, task-arithmetic, ties: every tensor merged into one model
"""

from __future__ import annotations

from ..settings import Mode
from .base import Planner
from .calibrated import CalibratedPlanner
from .grouped import BudgetPlanner, LosslessPlanner, ThresholdPlanner
from .merged import AveragePlanner, TaskArithmeticPlanner, TiesPlanner
from .reference import ReferencePlanner

PLANNERS: dict[Mode, Planner] = {
    p.mode: p
    for p in (
        LosslessPlanner(),
        ThresholdPlanner(),
        BudgetPlanner(),
        CalibratedPlanner(),
        ReferencePlanner(),
        AveragePlanner(),
        TaskArithmeticPlanner(),
        TiesPlanner(),
    )
}
assert list(PLANNERS) == list(Mode), "every mode has one planner"


def planner_for(mode: Mode | str) -> Planner:
    """The planner of `mode` (a `Mode` or its value)."""
    return PLANNERS[Mode(mode)]


__all__ = ["PLANNERS", "Planner", "planner_for"]
