"""What a planner decides, as data: each MoE layer's bank (`LayerPlan`), the slots that carry
a correction (`SlotDelta`), and the one definition of the values a bank entry stores
(`stored_bank_part`), which the writer writes and corrections are taken against.

Every expert of a layer is a flat index `model * E + expert` (as in `grouping`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..analysis.calibration import LayerCosts, ModelActivations
from ..artifact.corrections import FORMATS, Components, corrected
from ..artifact.manifest import HeldoutCheck
from ..io.checkpoint import Checkpoint
from .grouping import LayerGroups

Combine = Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor]
"""A merging baseline on one tensor: every model's version of it, the base's (or None) -> merged."""


@dataclass(frozen=True)
class SlotDelta:
    """Slot (model, expert) of a layer carries a delta of `format` at `size` (corrections.py)."""

    model: int
    expert: int
    format: str
    size: int | None


@dataclass
class LayerPlan:
    layer: str
    clusters: list[list[int]]
    """Flat member indices (model * E + expert) of each bank expert, in bank order."""
    representatives: list[int | None]
    """The member stored for each bank expert; None = computed from its members."""
    weights: list[list[float] | None] | None = None
    """Per bank expert with a computed representative: the members' weights of a weighted
    mean (None: the plain mean)."""
    combine: Combine | None = None
    """A merging baseline's formula (average, task-arithmetic, ties): computes every part of
    every bank expert from its members' (and the base's)."""
    deltas: list[SlotDelta] = field(default_factory=list)
    """Slots served by their bank entry plus a compressed correction (calibrated + deltas)."""
    item_digests: list[str] | None = None
    """Every expert's digest (by flat index), when the planner hashed them: the manifest
    records each stored representative's (`BankEntry.digest`)."""

    @property
    def digests(self) -> list[str | None]:
        """Each bank entry's digest: its representative's, None for a computed one or unknown."""
        d = self.item_digests
        return [None if d is None or rep is None else d[rep] for rep in self.representatives]

    def bank_index(self, flat_index: int) -> int:
        """The bank entry that serves expert `flat_index`."""
        return next(k for k, members in enumerate(self.clusters) if flat_index in members)


@dataclass
class CalibratedInputs:
    """What calibrated planning measures once: each model's activations, and per layer the
    identical groups, the experts' digests and the substitution costs."""

    acts: list[ModelActivations]
    groups: list[LayerGroups]
    digests: list[list[str]]
    costs: list[LayerCosts]
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    """Per layer name, the reference system's same-index distances
    (`baselines.reference_distances`), when the held-back check needs its plan; else empty."""


@dataclass
class Decision:
    """What a planner decided: each MoE layer's bank, and (calibrated mode) what the held-back
    check measured, for the manifest."""

    plans: list[LayerPlan]
    heldout: HeldoutCheck | None = None


def stored_bank_part(part_of: Callable[[int], torch.Tensor], p: LayerPlan, k: int) -> torch.Tensor:
    """The values bank entry `k` of a (non-baseline) plan stores for one part, given that
    part of each expert by flat index (`part_of`): its representative's, or the (weighted)
    mean of its members. The one definition: the writer writes it, deltas are taken
    against it (`writing.write_deltas`, `correction_plan`)."""
    members, rep = p.clusters[k], p.representatives[k]
    if rep is not None:
        return part_of(rep)
    w = (p.weights[k] if p.weights else None) or [1.0] * len(members)
    return weighted_mean((part_of(i) for i in members), w)


def delta_components(own: torch.Tensor, bank: torch.Tensor, d: SlotDelta, dtype: torch.dtype) -> Components:
    """The stored components of slot delta `d` for one part: `own - bank` in float32, encoded
    (what `writing.write_deltas` writes)."""
    return FORMATS[d.format].encode(own.float() - bank.float(), d.size, dtype)


def served_part(
    part_of: Callable[[int], torch.Tensor], p: LayerPlan, flat_index: int, d: SlotDelta | None, dtype: torch.dtype
) -> torch.Tensor:
    """What slot `flat_index` runs for one part under plan `p`: its bank entry's stored values
    (`stored_bank_part`), corrected by its delta `d` if it has one (`corrections.corrected`, as
    export and the runtime compute it)."""
    bank = stored_bank_part(part_of, p, p.bank_index(flat_index))
    if d is None:
        return bank
    return corrected(bank, delta_components(part_of(flat_index), bank, d, dtype), d.format, d.size)


def part_reader(ckpts: list[Checkpoint], layer: str, part: str) -> Callable[[int], torch.Tensor]:
    """Flat index (model * E + expert) -> that expert's `part` in `layer`, read now."""
    E = ckpts[0].num_experts
    return lambda i: ckpts[i // E].expert_part(layer, i % E, part)


def weighted_mean(tensors: Iterable[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i, accumulated in float64 one tensor at a time (an iterator is
    read lazily), cast to the inputs' dtype."""
    acc, dtype = None, None
    for t, w in zip(tensors, weights):
        if acc is None:
            acc, dtype = torch.zeros(t.shape, dtype=torch.float64), t.dtype
        acc.add_(t.to(torch.float64), alpha=w)
    assert acc is not None and dtype is not None
    return acc.div_(sum(weights)).to(dtype)
