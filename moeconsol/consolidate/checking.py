"""The held-back check of `merge --mode calibrated`: candidate plans at the same memory, measured
by real forwards of each consolidated variant on its held-back calibration data.

Candidates (`candidate_plans`), all within the merge's budget:

- `calibrated`: the calibrated planner's own plan (with `--deltas`: its bank and corrections);
- `budget`: `merge --mode budget`'s plan (weights alone, medoid representatives);
- `reference`: the reference system's plan (`merge --mode reference`);
- `average`: bank entry e of each layer = the mean of every model's expert e (uniform
  averaging of the experts; every variant keeps its own non-expert tensors); it holds one
  model's worth of experts, the floor, so it fits every budget; left out where bit-identical
  experts at different indices rule the same-index clusters out.

A candidate that cannot be made (a bank the same-model rule cannot reach) is left out, and so
is one whose plan is identical to an earlier one's (it shares its figures).

`measure` loads one model at a time: the base (when it is not one of the variants) to score
every variant's held-back data, then each variant: its own loss, then each candidate's, the
candidate served by replacing only its experts (`served.ServedVariant`). The figures and the
choice are `choice`'s; a variant below its base under every candidate is raised: the bank
entries serving its most costly shared slots store its own experts (`raise_variants`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..analysis.calibration import DEFAULT_CHUNK_LEN, load_model, load_tokenizer
from ..analysis.heldout import (
    DEFAULT_HELDOUT_TOKENS,
    CalibrationData,
    HeldoutLoss,
    ScoredBatch,
    heldout_batches,
    heldout_loss,
)
from ..artifact.reader import Progress
from ..errors import SettingsError
from ..io.checkpoint import Checkpoint
from .choice import Losses
from .grouping import choose_representative, cluster_budget
from .plan import CalibratedInputs, LayerPlan
from .served import ServedVariant

RAISE_SHARES = (0.125, 0.25, 0.5, 1.0)
"""Shares of a raised variant's shared slots given back their own experts, tried in turn
(`raise_variants`)."""


@dataclass
class Candidate:
    name: str
    plans: list[LayerPlan]
    same_as: str | None = None
    """An earlier candidate with the identical plan (its figures are shared)."""


def signature(plans: list[LayerPlan]) -> tuple:
    """What a plan serves, as a comparable value."""
    return tuple(
        (
            tuple(map(tuple, p.clusters)),
            tuple(p.representatives),
            None if p.weights is None else tuple(None if w is None else tuple(w) for w in p.weights),
            tuple(p.deltas),
        )
        for p in plans
    )


def same_index_plans(ckpts: list[Checkpoint], inputs: CalibratedInputs) -> list[LayerPlan] | None:
    """Uniform averaging of the experts: bank entry e = the mean of every model's expert e (its
    first member where all members are bit-identical); None where identical experts at
    different indices rule it out."""
    E, N = ckpts[0].num_experts, len(ckpts)
    plans = []
    for lg, d in zip(inputs.groups, inputs.digests):
        if any(len({i % E for i in g}) > 1 for g in lg.groups):
            return None
        clusters = [[m * E + e for m in range(N)] for e in range(E)]
        reps = [c[0] if len({d[i] for i in c}) == 1 else None for c in clusters]
        plans.append(LayerPlan(lg.layer, clusters, reps))
    return plans


def candidate_plans(makers: list[tuple[str, Callable[[], list[LayerPlan] | None]]]) -> list[Candidate]:
    """The candidates of the check, in order (module docstring), from (name, make) pairs: a
    make that returns None or raises `SettingsError` (a bank out of the mode's reach) leaves
    its candidate out."""
    out: list[Candidate] = []
    seen: dict[tuple, str] = {}
    for name, make in makers:
        try:
            plans = make()
        except SettingsError:
            continue
        if plans is None:
            continue
        sig = signature(plans)
        out.append(Candidate(name, plans, seen.get(sig)))
        seen.setdefault(sig, name)
    return out


def budget_plans(inputs: CalibratedInputs, max_bank: int) -> list[LayerPlan]:
    """`merge --mode budget`'s plan from the calibrated planner's own measurements (its metric's
    distances): closest first over all layers, medoid representatives."""
    clusters = cluster_budget(inputs.groups, max_bank)
    return [
        LayerPlan(lg.layer, cs, [choose_representative(c, "medoid", d, lg.distance) for c in cs])
        for lg, d, cs in zip(inputs.groups, inputs.digests, clusters)
    ]


# -- measuring -------------------------------------------------------------------------------


class Measurer:
    """Held-back losses of the variants of `ckpts`, one model in memory at a time."""

    def __init__(
        self,
        ckpts: list[Checkpoint],
        held: list[CalibrationData],
        digests: list[list[str]],
        max_tokens: int = DEFAULT_HELDOUT_TOKENS,
    ):
        self.ckpts, self.digests = ckpts, digests
        self.batches = [self._batches(c, h, max_tokens) for c, h in zip(ckpts, held)]
        self.read_bytes = 0

    @staticmethod
    def _batches(ckpt: Checkpoint, held: CalibrationData, max_tokens: int) -> list[ScoredBatch]:
        config = ckpt.config
        start = None
        if config.get("is_encoder_decoder"):
            start = config.get("decoder_start_token_id") or 0
        limit = config.get("max_position_embeddings") or DEFAULT_CHUNK_LEN
        return heldout_batches(held, load_tokenizer(ckpt), start, min(DEFAULT_CHUNK_LEN, int(limit)), max_tokens)

    def tokens(self, m: int) -> int:
        return sum(b.tokens for b in self.batches[m])

    def losses_of(self, model) -> list[HeldoutLoss]:
        """A loaded model's losses on every variant's held-back data (the base's figures)."""
        return [heldout_loss(model, b) for b in self.batches]

    def variant(self, m: int) -> VariantSession:
        return VariantSession(self, m)


class VariantSession:
    """Variant m loaded once; its own loss, then the loss of any plan served to it."""

    def __init__(self, measurer: Measurer, m: int):
        self.measurer, self.m = measurer, m
        self.model = load_model(measurer.ckpts[m])
        self.own_result = heldout_loss(self.model, measurer.batches[m])
        self.own = self.own_result.loss
        self.served = ServedVariant(measurer.ckpts, m, self.model, measurer.digests)

    def loss(self, plans: list[LayerPlan]) -> float:
        """The held-back loss of this variant served by `plans`."""
        return self.measure(plans).loss

    def measure(self, plans: list[LayerPlan]) -> HeldoutLoss:
        before = self.served.read_bytes
        foreign = self.served.serve(plans)
        self.measurer.read_bytes += self.served.read_bytes - before
        if foreign == 0:
            return self.own_result
        return heldout_loss(self.model, self.measurer.batches[self.m])

    def close(self) -> None:
        del self.served, self.model


@dataclass
class Measured:
    """Every variant's held-back losses: own and base, and under each candidate."""

    losses: list[Losses]
    candidate_losses: dict[str, list[float]]


def measure(
    ckpts: list[Checkpoint],
    measurer: Measurer,
    candidates: list[Candidate],
    base: Checkpoint | None,
    base_index: int | None,
    progress: Progress | None = None,
) -> Measured:
    """Own, base and candidate losses of every variant (module docstring)."""
    N = len(ckpts)
    base_losses: list[float | None] = [None] * N
    steps, done = N + (base is not None), 0
    if base is not None:
        if progress:
            progress("check", done, steps)
        model = load_model(base)
        base_losses = [x.loss for x in measurer.losses_of(model)]
        del model
        done += 1
    own: list[float] = []
    by_candidate: dict[str, list[float]] = {c.name: [] for c in candidates}
    for m in range(N):
        if progress:
            progress("check", done, steps)
        session = measurer.variant(m)
        if base_index == m:
            base_losses = [x.loss for x in measurer.losses_of(session.model)]
        own.append(session.own)
        for c in candidates:
            loss = by_candidate[c.same_as][m] if c.same_as else session.loss(c.plans)
            by_candidate[c.name].append(loss)
        session.close()
        done += 1
    if progress:
        progress("check", steps, steps)
    return Measured([Losses(o, b) for o, b in zip(own, base_losses)], by_candidate)


def figures(measured: Measured, names: list[str]) -> dict[str, dict[str, float]]:
    """Candidate -> variant name -> figure (`choice.Losses.figure`)."""
    return {
        c: {n: measured.losses[m].figure(loss) for m, (n, loss) in enumerate(zip(names, losses))}
        for c, losses in measured.candidate_losses.items()
    }


def below_base_everywhere(measured: Measured) -> list[int]:
    """Variants whose held-back loss is above their base's under every candidate."""
    return [
        m
        for m, lo in enumerate(measured.losses)
        if all(lo.below_base(losses[m]) for losses in measured.candidate_losses.values())
    ]


def shared_slots(plans: list[LayerPlan], inputs: CalibratedInputs, m: int) -> list[tuple[int, int]]:
    """Model m's slots (layer position, flat index) that `plans` do not serve with its own
    expert's bytes, most costly first: by the planning cost of what serves them (the largest
    over the members of a computed entry), then by the weight distance to it."""
    E = len(inputs.digests[0]) // len(inputs.acts)  # flat indices: model * E + expert
    keyed = []
    for li, p in enumerate(plans):
        cost, distance, digests = inputs.costs[li].cost, inputs.groups[li].distance, inputs.digests[li]
        delta_slots = {d.model * E + d.expert for d in p.deltas}
        for e in range(E):
            i = m * E + e
            k = p.bank_index(i)
            rep = p.representatives[k]
            if rep is not None and digests[rep] == digests[i] and i not in delta_slots:
                continue
            servers = [rep] if rep is not None else [j for j in p.clusters[k] if j != i]
            far = max((distance[i, j] for j in servers), default=0.0) if distance is not None else 0.0
            keyed.append((-max(cost[i, j] for j in servers), -far, li, i))
    return [(li, i) for _, _, li, i in sorted(keyed)]


def own_first(
    plans: list[LayerPlan], slots: list[tuple[int, int]], digests: list[list[str]], num_experts: int
) -> list[LayerPlan]:
    """A copy of `plans` in which the bank entry serving each of `slots` (layer position, flat
    index) stores that slot's own expert (the first slot to claim an entry keeps it); deltas of
    slots the entry now stores bit for bit are dropped (the others are taken against the new
    entry when written)."""
    out = [
        replace(
            p,
            representatives=list(p.representatives),
            weights=None if p.weights is None else list(p.weights),
            deltas=list(p.deltas),
        )
        for p in plans
    ]
    claimed: set[tuple[int, int]] = set()
    for li, i in slots:
        p = out[li]
        k = p.bank_index(i)
        if (li, k) in claimed:
            continue
        claimed.add((li, k))
        p.representatives[k] = i
        if p.weights is not None:
            p.weights[k] = None
        same = {j for j in p.clusters[k] if digests[li][j] == digests[li][i]}
        p.deltas = [d for d in p.deltas if d.model * num_experts + d.expert not in same]
    return out


def raise_variants(
    measurer: Measurer,
    measured: Measured,
    raised: list[int],
    plans: list[LayerPlan],
    inputs: CalibratedInputs,
    progress: Progress | None = None,
) -> tuple[list[LayerPlan], list[float]]:
    """Give the variants in `raised` more of their own experts in `plans` (the rule's choice):
    the bank entries serving the most costly of their shared slots (`shared_slots`) store
    their own experts instead (`own_first`), for each of `RAISE_SHARES` of those slots in
    turn; the first share under which none of them is below its base is taken, else all (as
    far as the budget allows: the bank stays the same size). Returns that plan and every
    variant's held-back loss under it."""
    order = {m: shared_slots(plans, inputs, m) for m in raised}
    options = []
    for share in RAISE_SHARES:
        slots = [x for m in raised for x in order[m][: math.ceil(share * len(order[m]))]]
        options.append(own_first(plans, slots, inputs.digests, measurer.ckpts[0].num_experts))
    losses: dict[int, list[float]] = {}
    for m in raised:
        session = measurer.variant(m)
        losses[m] = [session.loss(option) for option in options]
        session.close()
    pick = next(
        (k for k in range(len(options)) if not any(measured.losses[m].below_base(losses[m][k]) for m in raised)),
        len(options) - 1,
    )
    final = options[pick]
    n_models = len(measured.losses)
    out = []
    for m in range(n_models):
        if progress:
            progress("raise", m, n_models)
        if m in raised:
            out.append(losses[m][pick])
            continue
        session = measurer.variant(m)
        out.append(session.loss(final))
        session.close()
    if progress:
        progress("raise", n_models, n_models)
    return final, out
