"""The interface of a merge mode's planner: what it takes, what it needs, its plan."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ...artifact.reader import Progress
from ...io.checkpoint import Checkpoint
from ..nonexpert import NonExpertPlan, plan_non_experts
from ..plan import Decision, LayerPlan
from ..settings import MergeSettings, Mode, budget_experts


class Planner(ABC):
    """How one merge mode chooses each MoE layer's bank (pass 1 of merge).

    `check` refuses the settings the mode does not take and fills its defaults; `plan`
    returns one `LayerPlan` per MoE layer, reading at most one layer of all models at a
    time; `plan_non_experts` says which non-expert tensors are stored; `record` is what the
    manifest's `consolidation` says about it."""

    mode: Mode
    """The mode it plans (one planner per mode: `planners.PLANNERS`)."""
    needs_base: bool = False
    """Takes a base checkpoint (`settings.base`): the task vectors are taken against it."""
    needs_calibration: bool = False
    """Runs every model over its calibration data (`settings.calibration`)."""
    budgeted: bool = False
    """Sizes the bank by `settings.budget` (recorded as `budget_experts`)."""
    merges_weights: bool = False
    """Every variant maps to the same merged tensors, non-expert ones included."""
    uses_representative: bool = True
    """`settings.representative` picks what a shared bank entry stores."""
    takes_base: bool = False
    """Takes a base checkpoint if one is given (calibrated: its held-back check scores the
    retained gain against it)."""

    @abstractmethod
    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        """Refuse options that do not apply to the mode or are out of range; fill defaults."""

    @abstractmethod
    def plan(self, ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
        """Each MoE layer's bank, in layer order."""

    def decide(
        self, ckpts: list[Checkpoint], s: MergeSettings, base: Checkpoint | None, progress: Progress | None = None
    ) -> Decision:
        """The plan merge writes (`plan`, unless the mode measures its candidates first)."""
        return Decision(self.plan(ckpts, s, progress))

    def plan_non_experts(
        self, ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None
    ) -> NonExpertPlan:
        """Each model's non-expert tensors: every version stored once (bit-identical ones shared)."""
        return plan_non_experts(ckpts, progress)

    def record(self, s: MergeSettings, ckpts: list[Checkpoint], base: Checkpoint | None) -> dict[str, Any]:
        """The manifest's `consolidation` record: the settings that made the bank."""
        return {
            "mode": self.mode.value,
            "metric": s.metric,
            "threshold": s.threshold,
            "budget": s.budget,
            "budget_experts": budget_experts(s.budget, ckpts) if self.budgeted else None,
            "representative": s.representative if self.uses_representative else None,
            "probe_seed": s.seed if s.metric == "cka" else None,
        }
