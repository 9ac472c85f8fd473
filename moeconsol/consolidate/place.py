"""Placing a new variant's experts in a budget or threshold artifact's bank, against the
entries it already has (`moeconsol add` on such an artifact); the other variants' slots are
not re-planned.

Each MoE layer: the bank's stored experts and the new variant's are read (one layer in
memory, as merge's threshold and budget modes hold one layer of all models), and the
artifact's metric between each new expert and each stored one is computed from their Gram
matrix (`similarity.weight_metrics`; bit-identical pairs exact). A new expert bit-identical to
a stored one (or to an earlier new one) always shares it. Then:

- threshold: a new expert gets an entry of its own when no stored expert (nor a new entry
  of its layer) lies within the threshold; else it joins the closest. Unlike a merge's
  complete linkage, it is compared with each entry's stored expert only.
- budget: the bank may grow to what the budget allows with N + 1 variants
  (`settings.budget_experts`); the new experts farthest from every stored expert get entries
  of their own, in that order, until it does; every other one joins the closest entry, stored
  or new, of its layer.

A slot served by an entry that stores another expert is not "kept": `PlacementReport` counts,
per variant, the slots served by their own stored expert, before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..analysis.similarity import gram_matrix, weight_metrics
from ..artifact.manifest import BankEntry, LayerEntry, Manifest
from ..artifact.reader import Artifact, Progress
from ..errors import SettingsError
from ..io.checkpoint import Checkpoint, expert_nbytes
from ..io.digest import tensor_digest
from ..io.sizes import format_bytes
from .edit import appended_key
from .grouping import threshold_to_distance, to_distance
from .settings import Mode, budget_slots


@dataclass
class PlacementReport:
    mode: str
    budget_experts: int | None
    """Bank entries (all layers) the budget allows with the new variant (budget mode)."""
    budget: str | None = None
    """The budget it was placed within (budget mode)."""
    kept_before: dict[str, int] = field(default_factory=dict)
    """Variant -> its slots served by their own stored expert, before the add."""
    kept_after: dict[str, int] = field(default_factory=dict)
    slots: int = 0
    """Slots per variant (layers x experts)."""


def own_slots(m: Manifest) -> dict[str, int]:
    """Per variant: slots whose bank entry stores that very expert (its representative)."""
    out = {model.name: 0 for model in m.models}
    for entry in m.layers:
        for b in entry.bank:
            if b.representative is not None:
                out[m.models[b.representative[0]].name] += 1
    return out


def allowed_experts(budget: str, spec: Manifest, one: int) -> int:
    """Bank entries a budget allows over all layers with one more variant (as `budget_experts`)."""
    total = (len(spec.models) + 1) * len(spec.layers) * spec.experts_per_layer
    return budget_slots(budget, total, one)[0]


def place(
    art: Artifact, ckpt: Checkpoint, budget: str | None, progress: Progress | None = None
) -> tuple[list[LayerEntry], list[tuple[str, int, str]], PlacementReport]:
    """Each layer with the new variant in it, the new entries to write (layer, expert, stored
    key prefix), and what every variant keeps before and after."""
    spec = art.spec
    mode = spec.consolidation.get("mode")
    metric = spec.consolidation.get("metric") or "cosine"
    one = expert_nbytes(ckpt)
    m, E = len(spec.models), spec.experts_per_layer
    bank_now = sum(len(x.bank) for x in spec.layers)
    report = PlacementReport(str(mode), None, kept_before=own_slots(spec), slots=len(spec.layers) * E)
    cutoff = None
    if mode == Mode.THRESHOLD.value:
        if budget is not None:
            raise SettingsError("--budget applies to budget artifacts; this one was merged with a threshold")
        cutoff = threshold_to_distance(metric, float(spec.consolidation["threshold"]))
    else:
        budget = budget if budget is not None else str(spec.consolidation.get("budget"))
        report.budget_experts, report.budget = allowed_experts(budget, spec, one), budget
        if report.budget_experts < bank_now:
            raise SettingsError(
                f"budget {budget!r} allows {report.budget_experts} bank experts ({format_bytes(report.budget_experts * one)}) "
                f"with the new variant, and the bank already holds {bank_now}: fitting it would mean re-planning the "
                "other variants (--replan is not supported): give a larger budget, or re-merge"
            )

    # per layer: the new experts' distances to the stored ones and to each other
    dist_bank: list[np.ndarray] = []
    dist_new: list[np.ndarray] = []
    same: list[list[int | None]] = []  # new expert -> stored entry it is bit-identical to
    for i, entry in enumerate(spec.layers):
        if progress:
            progress("plan", i, len(spec.layers))
        stored = [art.bank_expert(entry.layer, k) for k in range(len(entry.bank))]
        new = [ckpt.expert(entry.layer, e) for e in range(E)]
        digests = [tensor_digest(x) for x in stored + new]
        identical = np.array([[a == b for b in digests] for a in digests])
        metrics = weight_metrics(gram_matrix(stored + new, spec.parts), identical)
        d = to_distance(metrics[metric], metric)
        B = len(stored)
        dist_bank.append(d[B:, :B])
        dist_new.append(d[B:, B:])
        first = {dg: k for k, dg in reversed(list(enumerate(digests[:B])))}
        same.append([first.get(dg) for dg in digests[B:]])
        del stored, new
    if progress:
        progress("plan", len(spec.layers), len(spec.layers))

    # which new experts get entries of their own
    own: set[tuple[int, int]] = set()
    candidates = []
    for li in range(len(spec.layers)):
        for e in range(E):
            if same[li][e] is None and not any(same[li][x] is None and dist_new[li][e, x] == 0 for x in range(e)):
                candidates.append((float(dist_bank[li][e].min(initial=np.inf)), li, e))
    if cutoff is not None:
        for li in range(len(spec.layers)):
            for e in range(E):
                if any(c[1:] == (li, e) for c in candidates):
                    near = min(
                        [dist_bank[li][e].min(initial=np.inf)] + [dist_new[li][e, x] for (l2, x) in own if l2 == li]
                    )
                    if near > cutoff:
                        own.add((li, e))
    else:
        room = report.budget_experts - bank_now
        for _, li, e in sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))[:room]:
            own.add((li, e))

    layers: list[LayerEntry] = []
    new_entries: list[tuple[str, int, str]] = []
    for li, entry in enumerate(spec.layers):
        bank = [replace(b, members=list(b.members)) for b in entry.bank]
        index: dict[int, int] = {}
        for e in sorted(e for (l2, e) in own if l2 == li):
            k = len(bank)
            key = appended_key(spec, entry.layer, k)
            bank.append(BankEntry([], (m, e), None, None, key))
            new_entries.append((entry.layer, e, key or f"bank.{entry.layer}.{k}"))
            index[e] = k
        slots = []
        for e in range(E):
            if e in index:
                k = index[e]
            elif same[li][e] is not None:
                k = same[li][e]
            else:
                options = [(float(dist_bank[li][e, k]), k) for k in range(len(entry.bank))]
                options += [(float(dist_new[li][e, x]), index[x]) for x in index]
                k = min(options)[1]
            bank[k].members.append((m, e))
            slots.append(k)
        layers.append(replace(entry, bank=bank, slot_map={**entry.slot_map, ckpt.name: slots}))
    return layers, new_entries, report
