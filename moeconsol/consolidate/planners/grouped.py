"""Lossless, threshold and budget modes: experts grouped by their weights alone.

Each MoE layer of all N models is measured in turn (one layer in memory): lossless hashes
every expert's bytes on disk and builds no tensor; threshold and budget also take the
layer's distance matrix (`similarity.layer_similarity`). Only digests and the small
(N*E)^2 matrices are kept. Lossless and threshold cluster each layer alone; budget clusters
all layers together (closest pairs first across layers, `grouping.cluster_budget`).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import numpy as np

from ...analysis.similarity import (
    DEFAULT_PROBES,
    gaussian_probes,
    hidden_size,
    identity_keys,
    layer_similarity,
    mixed,
)
from ...artifact.reader import Progress
from ...errors import SettingsError
from ...io.checkpoint import Checkpoint, warn_unusual
from ...io.digest import range_digest, tensor_digest, value_flags
from ..grouping import (
    LayerGroups,
    choose_representative,
    cluster_budget,
    cluster_lossless,
    cluster_threshold,
    identical_groups,
    threshold_to_distance,
    to_distance,
)
from ..plan import LayerPlan
from ..settings import MergeSettings, Mode, budget_experts, check_budget, checked_metric, refuse
from .base import Planner


class GroupedPlanner(Planner):
    """Measure every layer, cluster (`cluster`), pick each cluster's representative."""

    full_digests = False
    """`measure` gives every expert's full digest (not a fingerprint where no other expert
    could equal it): the manifest may record them (`BankEntry.digest`)."""

    def plan(self, ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
        ref = ckpts[0]
        groups: list[LayerGroups] = []
        digests: list[list[str]] = []
        for i, layer in enumerate(ref.moe_layers):
            if progress:
                progress("plan", i, len(ref.moe_layers))
            layer_digests, distance = self.measure(ckpts, layer, i, s)
            groups.append(identical_groups(layer, layer_digests, ref.num_experts, distance))
            digests.append(layer_digests)
        if progress:
            progress("plan", len(ref.moe_layers), len(ref.moe_layers))
        clusters = self.cluster(groups, ckpts, s)
        return [
            LayerPlan(
                lg.layer,
                cs,
                [_stored_as_released(ckpts, c, choose_representative(c, s.representative, d, lg.distance)) for c in cs],
                item_digests=d if self.full_digests else None,
            )
            for lg, d, cs in zip(groups, digests, clusters)
        ]

    def measure(
        self, ckpts: list[Checkpoint], layer: str, position: int, s: MergeSettings
    ) -> tuple[list[str], np.ndarray | None]:
        """(digest of every expert, item x item distance matrix) of one layer."""
        probes = None
        if s.metric == "cka":
            probes = gaussian_probes(hidden_size(ckpts[0]), DEFAULT_PROBES, s.seed + position)
        sim = layer_similarity(ckpts, layer, [s.metric], probes)
        return sim.digests, to_distance(sim.matrices[s.metric], s.metric)

    @abstractmethod
    def cluster(self, groups: list[LayerGroups], ckpts: list[Checkpoint], s: MergeSettings) -> list[list[list[int]]]:
        """Each layer's clusters of flat expert indices."""


class LosslessPlanner(GroupedPlanner):
    """Share only bit-identical experts."""

    mode = Mode.LOSSLESS
    full_digests = True

    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        refuse(s, self.mode)
        return s

    def measure(
        self, ckpts: list[Checkpoint], layer: str, position: int, s: MergeSettings
    ) -> tuple[list[str], np.ndarray | None]:
        """Identity only: hash the bytes on disk, build no tensors (beside a quantized release,
        an unquantized model's experts are compared with its dequantized: `identity_keys`)."""
        if mixed(ckpts):
            return identity_keys(ckpts, layer), None
        return [scanned_digest(c, layer, e) for c in ckpts for e in range(ckpts[0].num_experts)], None

    def cluster(self, groups: list[LayerGroups], ckpts: list[Checkpoint], s: MergeSettings) -> list[list[list[int]]]:
        return [cluster_lossless(lg) for lg in groups]


class ThresholdPlanner(GroupedPlanner):
    """Complete linkage per layer, cut at the threshold."""

    mode = Mode.THRESHOLD

    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        refuse(s, self.mode)
        metric = checked_metric(s)
        if s.threshold is None:
            raise SettingsError("`mode` threshold needs a `threshold` (e.g. `metric` cosine, `threshold` 0.99)")
        threshold_to_distance(metric, s.threshold)
        return replace(s, metric=metric)

    def cluster(self, groups: list[LayerGroups], ckpts: list[Checkpoint], s: MergeSettings) -> list[list[list[int]]]:
        cutoff = threshold_to_distance(s.metric, s.threshold)
        return [cluster_threshold(lg, cutoff) for lg in groups]


class BudgetPlanner(GroupedPlanner):
    """Complete linkage over all layers at once, closest pairs first, until the bank fits."""

    mode = Mode.BUDGET
    budgeted = True

    def check(self, s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
        refuse(s, self.mode)
        metric = checked_metric(s)
        check_budget(s, self.mode, ckpts)
        return replace(s, metric=metric)

    def cluster(self, groups: list[LayerGroups], ckpts: list[Checkpoint], s: MergeSettings) -> list[list[list[int]]]:
        return cluster_budget(groups, budget_experts(s.budget, ckpts))


def _stored_as_released(ckpts: list[Checkpoint], cluster: list[int], rep: int | None) -> int | None:
    """Beside a quantized release, a bank entry holding one of its experts stores it as released
    (codes and scales), so that the release exports bit for bit; its unquantized members are
    its values (lossless: `identity_keys`)."""
    if rep is None or not mixed(ckpts):
        return rep
    E = ckpts[0].num_experts
    return next((i for i in cluster if ckpts[i // E].quantization is not None), rep)


def scanned_digest(ckpt: Checkpoint, layer: str, expert: int) -> str:
    """An expert's identity digest from its bytes on disk, warning (as `read_layer` does)
    about NaN, infinite or all-zero parts seen in the same pass."""
    flags: dict[str, tuple[bool, bool]] = {}
    if ckpt.layout.contiguous:
        digest = range_digest(ckpt.expert_infos(layer, expert), flags)
    else:  # strided parts (gpt-oss): read as tensors; the same digest (digest.py)
        parts = ckpt.expert(layer, expert)
        digest = tensor_digest(parts)
        flags = {part: value_flags(t) for part, t in parts.items()}
    for part, (finite, nonzero) in flags.items():
        warn_unusual(ckpt.name, layer, expert, part, finite, nonzero)
    return digest
