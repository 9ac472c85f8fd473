"""The merging baselines as artifacts: average, task arithmetic and TIES merge every tensor.

Bank expert e of each layer is the merge of every model's expert e, and every non-expert
tensor is merged the same way (`nonexpert.plan_merged_non_experts`): every variant maps to
the same tensors. The formulas are `baselines`' (and docs/quality.md).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from ...artifact.reader import Progress
from ...errors import IncompatibleModelsError, SettingsError
from ...io.checkpoint import Checkpoint
from .. import baselines
from ..nonexpert import NonExpertPlan, plan_merged_non_experts
from ..plan import Combine, LayerPlan
from ..settings import MergeSettings, Mode, refuse
from .base import Planner


class MergedPlanner(Planner):
    """Every tensor merged across the models by the mode's formula (`merge`), experts by index."""

    merges_weights = True
    uses_representative = False

    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        refuse(s, self.mode)
        if self.needs_base and s.base is None:
            raise SettingsError(
                f"`mode` {self.mode} needs a `base`: the pre-trained checkpoint the models were fine-tuned from"
            )
        return s

    def plan(self, ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
        """Bank expert e of each layer = the merge of every model's expert e."""
        ref = ckpts[0]
        E, N = ref.num_experts, len(ckpts)
        return [
            LayerPlan(layer, [[m * E + e for m in range(N)] for e in range(E)], [None] * E, None, self.combiner(s))
            for layer in ref.moe_layers
        ]

    def plan_non_experts(
        self, ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None
    ) -> NonExpertPlan:
        return plan_merged_non_experts(ckpts, self.combiner(s))

    def combiner(self, s: MergeSettings) -> Combine:
        """`combine` under settings `s`."""
        return lambda tensors, base: self.combine(tensors, base, s)

    def combine(self, tensors: list[torch.Tensor], base: torch.Tensor | None, s: MergeSettings) -> torch.Tensor:
        """One merged tensor from every model's version of it (and the base's)."""
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise IncompatibleModelsError(
                    f"cannot merge integer tensors that differ between models (mode {self.mode})"
                )
            return tensors[0]
        return self.merge(tensors, base, s)

    @abstractmethod
    def merge(self, tensors: list[torch.Tensor], base: torch.Tensor | None, s: MergeSettings) -> torch.Tensor:
        """The mode's formula on floating-point tensors."""

    def record(self, s: MergeSettings, ckpts: list[Checkpoint], base: Checkpoint | None) -> dict[str, Any]:
        c = super().record(s, ckpts, base)
        c["base"] = None if base is None else base.source
        return c


class AveragePlanner(MergedPlanner):
    """(1/N) * sum_i t_i"""

    mode = Mode.AVERAGE

    def merge(self, tensors: list[torch.Tensor], base: torch.Tensor | None, s: MergeSettings) -> torch.Tensor:
        return baselines.uniform_average(tensors)


class TaskArithmeticPlanner(MergedPlanner):
    """base + scale * sum_i (t_i - base)"""

    mode = Mode.TASK_ARITHMETIC
    needs_base = True

    def merge(self, tensors: list[torch.Tensor], base: torch.Tensor | None, s: MergeSettings) -> torch.Tensor:
        assert base is not None
        return baselines.task_arithmetic(base, tensors, s.scale)

    def record(self, s: MergeSettings, ckpts: list[Checkpoint], base: Checkpoint | None) -> dict[str, Any]:
        return {**super().record(s, ckpts, base), "scale": s.scale}


class TiesPlanner(MergedPlanner):
    """base + scale * disjoint_mean(trim(t_i - base))"""

    mode = Mode.TIES
    needs_base = True

    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        s = super().check(s, ckpts)
        if not 0 < s.density <= 1:
            raise SettingsError(f"`density` must be in (0, 1], got {s.density}")
        return s

    def merge(self, tensors: list[torch.Tensor], base: torch.Tensor | None, s: MergeSettings) -> torch.Tensor:
        assert base is not None
        return baselines.ties(base, tensors, s.density, s.scale)

    def record(self, s: MergeSettings, ckpts: list[Checkpoint], base: Checkpoint | None) -> dict[str, Any]:
        return {**super().record(s, ckpts, base), "scale": s.scale, "density": s.density}
