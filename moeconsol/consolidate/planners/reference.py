"""Reference mode: the reference system's sharing plan (hamid-74/Multi-MoE), as its code does it."""

from __future__ import annotations

from ...analysis.similarity import read_layer
from ...artifact.reader import Progress
from ...errors import SettingsError
from ...io.checkpoint import Checkpoint
from .. import baselines
from ..plan import LayerPlan
from ..settings import MergeSettings, Mode, budget_experts, refuse
from .base import Planner


class ReferencePlanner(Planner):
    """Same-index positions shared by summed L2 distance, round-robin owners, as many as the
    budget needs (`baselines.reference_*`)."""

    mode = Mode.REFERENCE
    budgeted = True
    uses_representative = False

    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        refuse(s, self.mode)
        if s.budget is None:
            raise SettingsError(
                "`mode` reference needs a `budget`: bank bytes (40GB) or a fraction of all experts (0.5)"
            )
        budget_experts(s.budget, ckpts)
        return s

    def plan(self, ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
        return plan_reference(ckpts, s, progress)


def plan_reference(ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
    """The reference system's plan (baselines.reference_*): same-index positions sorted by
    summed pairwise L2 distance, the closest shared first, as many as the budget needs;
    a shared position keeps model (k mod N)'s expert for every model; the others stay
    per model (no deduplication, as in the reference system)."""
    ref = ckpts[0]
    L = len(ref.moe_layers)
    distances = {}
    for i, layer in enumerate(ref.moe_layers):
        if progress:
            progress("plan", i, L)
        distances[layer] = baselines.reference_distances(read_layer(ckpts, layer).experts)
    if progress:
        progress("plan", L, L)
    return reference_layer_plans(ckpts, distances, budget_experts(s.budget, ckpts))


def reference_layer_plans(ckpts: list[Checkpoint], distances: dict, max_bank: int) -> list[LayerPlan]:
    """The reference system's plan within `max_bank` bank experts, from each layer's summed
    same-index distances (`baselines.reference_distances`, by layer name)."""
    ref = ckpts[0]
    E, N, L = ref.num_experts, len(ckpts), len(ref.moe_layers)
    excess = N * L * E - max_bank
    shared = 0 if N == 1 or excess <= 0 else min(L * E, -(-excess // (N - 1)))
    plan = baselines.reference_plan(distances, N, shared)
    plans = []
    for layer in ref.moe_layers:
        clusters, reps = [], []
        for e in range(E):
            if e in plan[layer]:
                clusters.append([m * E + e for m in range(N)])
                reps.append(plan[layer][e] * E + e)
            else:
                clusters += [[m * E + e] for m in range(N)]
                reps += [m * E + e for m in range(N)]
        order = sorted(range(len(clusters)), key=lambda k: clusters[k][0])
        plans.append(LayerPlan(layer, [clusters[k] for k in order], [reps[k] for k in order]))
    return plans
