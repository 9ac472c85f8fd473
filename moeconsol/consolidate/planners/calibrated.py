"""Calibrated mode: budget mode driven by each model's own activations (module calibration).

Every model runs once over its own calibration data (`calibration.capture`); per layer, every
substitution of one expert by another is costed by the output error it causes there
(`calibration.substitution_costs`); the layers are clustered together greedily by least
added cost (`grouping.cluster_calibrated`), each model's costs weighted so that no model
carries most of it (`grouping.fair_weights`); then each shared entry's representative is
chosen on the same tokens. With deltas, the bank size and the slots' compressed corrections
share the budget (`correction_plan`).

The plan written is checked by measurement (`decide_calibrated`): the planner sees only the
first part of each calibration file (`heldout.split_calibration`), and its plan, budget
mode's, the reference system's and uniform averaging's are measured on the part held back
(`checking`); the rule of `choice` picks the one to write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from ...analysis.calibration import LayerCosts, ModelActivations, candidate_cost, capture, substitution_costs
from ...analysis.heldout import DEFAULT_HELDOUT, CalibrationData, read_calibration, split_calibration
from ...analysis.similarity import DEFAULT_PROBES, gaussian_probes, hidden_size, layer_similarity, read_layer
from ...artifact.corrections import AUTO
from ...artifact.manifest import HeldoutCheck, HeldoutVariant
from ...artifact.reader import Progress
from ...errors import SettingsError
from ...io.checkpoint import Checkpoint
from .. import baselines
from ..checking import (
    Measurer,
    below_base_everywhere,
    budget_plans,
    candidate_plans,
    figures,
    measure,
    raise_variants,
    same_index_plans,
)
from ..choice import MARGIN, choose
from ..correction_plan import check_delta_format, plan_with_deltas
from ..grouping import LayerGroups, cluster_calibrated, cluster_cost, fair_weights, identical_groups, to_distance
from ..plan import CalibratedInputs, Decision, LayerPlan, weighted_mean
from ..settings import (
    MergeSettings,
    Mode,
    budget_bytes,
    budget_experts,
    calibration_file,
    check_budget,
    checked_metric,
    refuse,
)
from .base import Planner
from .reference import reference_layer_plans

BASE_NAME = "base"
"""Without `--base`, a model of the merge with this name is the base of the held-back figures."""
RAISED = "raised"
"""The candidate name of the plan that raised variants below their base (`checking.raise_variants`)."""


class CalibratedPlanner(Planner):
    """Clustering by output error on each model's calibration data, within a budget; the plan
    written is checked against other candidates on held-back data (`checking`)."""

    mode = Mode.CALIBRATED
    needs_calibration = True
    budgeted = True
    takes_base = True

    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        refuse(s, self.mode)
        metric = checked_metric(s)
        check_budget(s, self.mode, ckpts)
        holdout = DEFAULT_HELDOUT if s.holdout is None else s.holdout
        if s.base is not None and holdout == 0:
            raise SettingsError(
                "`base` applies to calibrated mode's held-back check (its retained gain), which `holdout` 0 turns off"
            )
        if s.check_margin is not None and holdout == 0:
            raise SettingsError("`check_margin` applies to the held-back check, which `holdout` 0 turns off")
        margin = MARGIN if s.check_margin is None else s.check_margin
        for c in ckpts:
            calibration_file(s, c.name)
        unknown = sorted(set(s.calibration or {}) - {c.name for c in ckpts} - {"*"})
        if unknown:
            raise SettingsError(
                f"`calibration` names unknown model(s) {', '.join(unknown)}; the models are {', '.join(c.name for c in ckpts)}"
            )
        if s.calibration_tokens < 1:
            raise SettingsError(f"`calibration_tokens` must be at least 1, got {s.calibration_tokens}")
        if s.deltas:
            check_delta_format(s.delta_format, ckpts[0])
        return replace(s, metric=metric, holdout=holdout, check_margin=margin)

    def plan(self, ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
        return plan_calibrated(ckpts, s, progress)

    def decide(
        self, ckpts: list[Checkpoint], s: MergeSettings, base: Checkpoint | None, progress: Progress | None = None
    ) -> Decision:
        return decide_calibrated(ckpts, s, base, progress)

    def record(self, s: MergeSettings, ckpts: list[Checkpoint], base: Checkpoint | None) -> dict[str, Any]:
        c = super().record(s, ckpts, base)
        c["calibration"] = {ck.name: calibration_file(s, ck.name) for ck in ckpts}
        c["calibration_tokens"] = s.calibration_tokens
        c["holdout"] = s.holdout
        if base is not None:
            c["base"] = base.source
        if s.deltas:
            c["deltas"] = True
            c["delta_format"] = s.delta_format or AUTO
            c["budget_bytes"] = budget_bytes(s.budget, ckpts)
        return c


def plan_calibrated(ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
    """The calibrated planner's own plan from all of each model's calibration data, unchecked:
    capture every model once, cost every substitution per layer, cluster greedily by least
    added cost, then pick each shared expert's representative (s.representative). A layer at
    the floor (E bank experts) may instead take the same-index clusters of uniform averaging,
    when they cost less on the calibration tokens with their own representatives. With
    `s.deltas`, the bank size and the slots' deltas share the budget (`plan_with_deltas`)."""
    inputs = calibrated_inputs(ckpts, s, progress)
    return own_plans(ckpts, s, inputs, progress)


def own_plans(
    ckpts: list[Checkpoint], s: MergeSettings, inputs: CalibratedInputs, progress: Progress | None = None
) -> list[LayerPlan]:
    """The calibrated plan from measured inputs (with deltas: bank and corrections)."""
    clustering = partial(calibrated_plans, ckpts, s, inputs)
    if s.deltas:
        return plan_with_deltas(ckpts, s, inputs, clustering, progress)
    return clustering(budget_experts(s.budget, ckpts))


def decide_calibrated(
    ckpts: list[Checkpoint], s: MergeSettings, base: Checkpoint | None, progress: Progress | None = None
) -> Decision:
    """Plan on the first part of each model's calibration data and, unless the holdout is 0,
    measure the candidates on the part held back and write the rule's choice (`checking`,
    `choice`)."""
    holdout = DEFAULT_HELDOUT if s.holdout is None else s.holdout
    parts = [split_calibration(read_calibration(calibration_file(s, c.name)), holdout) for c in ckpts]
    inputs = calibrated_inputs(ckpts, s, progress, [p for p, _ in parts], reference=holdout > 0)
    own = own_plans(ckpts, s, inputs, progress)
    held = [h for _, h in parts]
    if holdout == 0:
        return Decision(own)
    started = time.perf_counter()
    max_bank = budget_experts(s.budget, ckpts)
    candidates = candidate_plans(
        [
            ("calibrated", lambda: own),
            ("budget", lambda: budget_plans(inputs, max_bank)),
            ("reference", lambda: reference_layer_plans(ckpts, inputs.reference, max_bank)),
            ("average", lambda: same_index_plans(ckpts, inputs)),
        ]
    )
    names = [c.name for c in ckpts]
    base_index = names.index(BASE_NAME) if base is None and BASE_NAME in names else None
    measurer = Measurer(ckpts, [h for h in held if h is not None], inputs.digests)
    measured = measure(ckpts, measurer, candidates, base, base_index, progress)
    figs = figures(measured, names)
    margin = MARGIN if s.check_margin is None else s.check_margin
    chosen = choose(figs, margin)
    plans = next(c.plans for c in candidates if c.name == chosen)
    losses = measured.candidate_losses[chosen]
    raised = below_base_everywhere(measured)
    if raised:
        plans, losses = raise_variants(measurer, measured, raised, plans, inputs, progress)
        figs[RAISED] = {n: measured.losses[m].figure(loss) for m, (n, loss) in enumerate(zip(names, losses))}
        chosen = RAISED
    check = HeldoutCheck(
        holdout=holdout,
        margin=margin,
        base=base.source if base is not None else (BASE_NAME if base_index is not None else None),
        chosen=chosen,
        variants={
            n: HeldoutVariant(lo.score, lo.figure(loss), loss, lo.own, lo.base, measurer.tokens(m))
            for m, (n, lo, loss) in enumerate(zip(names, measured.losses, losses))
        },
        candidates=figs,
        raised=[names[m] for m in raised],
        seconds=time.perf_counter() - started,
    )
    return Decision(plans, check)


def calibrated_inputs(
    ckpts: list[Checkpoint],
    s: MergeSettings,
    progress: Progress | None = None,
    data: list[CalibrationData] | None = None,
    reference: bool = False,
) -> CalibratedInputs:
    """Capture every model's activations (on `data`, else each model's whole calibration file)
    and cost every substitution, one layer at a time; with `reference`, also each layer's
    same-index distances of the reference system (for the held-back check's candidates)."""
    ref = ckpts[0]
    E, L = ref.num_experts, len(ref.moe_layers)
    acts = []
    for m, c in enumerate(ckpts):
        if progress:
            progress("calibrate", m, len(ckpts))
        source = calibration_file(s, c.name) if data is None else data[m]
        acts.append(capture(c, source, max_tokens=s.calibration_tokens))
    if progress:
        progress("calibrate", len(ckpts), len(ckpts))
    groups, digests, costs, distances = [], [], [], {}
    for i, layer in enumerate(ref.moe_layers):
        if progress:
            progress("plan", i, L)
        experts = read_layer(ckpts, layer)
        sim = layer_similarity(
            ckpts,
            layer,
            [s.metric],
            None if s.metric != "cka" else gaussian_probes(hidden_size(ref), DEFAULT_PROBES, s.seed + i),
            experts=experts,
        )
        groups.append(identical_groups(layer, sim.digests, E, to_distance(sim.matrices[s.metric], s.metric)))
        digests.append(sim.digests)
        costs.append(substitution_costs(ref, layer, experts.flat, acts))
        if reference:
            distances[layer] = baselines.reference_distances(experts.experts)
    if progress:
        progress("plan", L, L)
    return CalibratedInputs(acts, groups, digests, costs, distances)


def calibrated_plans(
    ckpts: list[Checkpoint], s: MergeSettings, inputs: CalibratedInputs, max_bank: int
) -> list[LayerPlan]:
    """The calibrated clustering into at most `max_bank` bank experts, with representatives;
    each model's costs weighted by `grouping.fair_weights`, so that no model carries most
    of the cost."""
    ref = ckpts[0]
    E = ref.num_experts
    acts = inputs.acts
    weights = fair_weights(inputs.groups, [c.cost for c in inputs.costs], max_bank)
    costs = [c.weighted(weights) for c in inputs.costs]
    clusters = cluster_calibrated(inputs.groups, [c.cost for c in costs], max_bank)
    plans = []
    for layer, cs, lg, d, lc in zip(ref.moe_layers, clusters, inputs.groups, inputs.digests, costs):
        flat: list = []  # the layer's experts, read only when a mean must be costed

        def experts() -> list:
            if not flat:
                flat.extend(read_layer(ckpts, layer).flat)
            return flat

        options = [cs]
        aligned = same_index_clusters(lg, len(ckpts))
        if len(cs) == E and aligned is not None and aligned != cs:
            options.append(aligned)
        chosen = [calibrated_representatives(ref, layer, c, d, lc, acts, s.representative, experts) for c in options]
        k = min(range(len(options)), key=lambda o: (chosen[o][2], o))
        plans.append(LayerPlan(layer, options[k], chosen[k][0], chosen[k][1]))
    return plans


def same_index_clusters(lg: LayerGroups, n_models: int) -> list[list[int]] | None:
    """The clusters of uniform averaging: bank expert e = every model's expert e; None where
    bit-identical experts across expert indices rule it out (they must share)."""
    E = lg.num_experts
    if any(len({i % E for i in g}) > 1 for g in lg.groups):
        return None
    return [[m * E + e for m in range(n_models)] for e in range(E)]


def calibrated_representatives(
    ref: Checkpoint,
    layer: str,
    clusters: list[list[int]],
    digests: list[str],
    lc: LayerCosts,
    acts: list[ModelActivations],
    rule: str,
    experts: Callable[[], list[dict[str, torch.Tensor]]],
) -> tuple[list[int | None], list[list[float] | None], float]:
    """(representatives, mean weights, total calibrated cost) of one layer's clusters under
    `rule`: `first` / `medoid` (the least-cost member) / `mean` (usage-weighted) / `best`
    (the cheaper of the two). The cost of a mean is measured on the calibration tokens
    (`calibration.candidate_cost`); `experts()` gives the layer's flat expert list."""
    reps: list[int | None] = []
    weights: list[list[float] | None] = []
    total = 0.0
    for members in clusters:
        best_cost, best = cluster_cost(members, lc.cost)
        if len({digests[i] for i in members}) == 1 or rule == "first":
            reps.append(members[0]), weights.append(None)
            total += float(lc.cost[members, members[0]].sum())
            continue
        w = [float(lc.usage[i]) for i in members]
        w = [1.0] * len(members) if sum(w) <= 0 else w
        if rule == "medoid":
            reps.append(best), weights.append(None)
            total += best_cost
            continue
        flat = experts()
        mean = {p: weighted_mean([flat[i][p] for i in members], w) for p in ref.layout.parts}
        mean_cost = candidate_cost(ref, layer, flat, members, mean, acts, lc.norm)
        if rule == "mean" or mean_cost < best_cost:
            reps.append(None), weights.append(w)
            total += mean_cost
        else:
            reps.append(best), weights.append(None)
            total += best_cost
    return reps, weights, total
