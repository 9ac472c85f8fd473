"""Grouping the experts of a layer, across models and expert indices, into a shared bank.

Every expert of one MoE layer is an *item*: flat index `model_index * E + expert_index`,
the same numbering as `similarity.layer_similarity`. Clustering works on *groups*:
bit-identical items (equal digests, `digest.py`) are collapsed first, because they may always share.
Two groups that hold experts of the same model never join one cluster in the lossy modes:
that model's router must still be able to tell its experts apart.

Modes:
- lossless:  the clusters are exactly the identical groups.
- threshold: complete-linkage hierarchical clustering (scipy) cut at the threshold, so every
  pair of members (hence every member and a member representative) is within it.
- budget:    the same complete linkage, run greedily over *all* layers at once: the closest
  pair of clusters anywhere is merged first, until the total bank fits (`reduce_to_budget`;
  when the same-model rule blocks every merge, a layer is rebuilt by sequential assignment,
  `pack`). Calibrated mode runs the same mechanism with calibrated costs.

Similarities are turned into distances (`1 - s` for cosine and CKA); a cosine threshold of
1.0 is a distance of 0, which only bit-identical experts have, so it equals lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..analysis.similarity import DISTANCE_METRICS, METRICS
from ..errors import SettingsError

REPRESENTATIVES = ("medoid", "first", "mean", "best")
"""best: calibrated mode only, the least-cost member or the usage-weighted mean, whichever costs less."""


def to_distance(matrix: np.ndarray, metric: str) -> np.ndarray:
    """Distance (0 = identical, larger = less alike) from a metric matrix."""
    d = matrix if metric in DISTANCE_METRICS else 1.0 - matrix
    return np.clip(d, 0.0, None)


def threshold_to_distance(metric: str, threshold: float) -> float:
    """The distance cut for a threshold, refusing one outside the metric's range."""
    if metric not in METRICS:
        raise SettingsError(f"unknown `metric` {metric!r}: choose from {', '.join(METRICS)}")
    if metric in DISTANCE_METRICS:
        high = 2.0 if metric == "relative-l2" else float("inf")
        if not 0.0 <= threshold <= high:
            raise SettingsError(
                f"`threshold` {threshold} out of range for {metric}: a distance, give a value from 0 "
                f"{'to 2' if metric == 'relative-l2' else 'up'} (0 = share only bit-identical experts)"
            )
        return float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise SettingsError(
            f"`threshold` {threshold} out of range for {metric}: a similarity, give a value from -1 to 1 "
            "(1.0 = share only bit-identical experts)"
        )
    return 1.0 - float(threshold)


@dataclass
class LayerGroups:
    """One layer's identical groups and the distances between them."""

    layer: str
    num_experts: int
    groups: list[list[int]]
    """Flat item indices of each group of bit-identical experts, ordered by first item."""
    distance: np.ndarray | None = None
    """Item x item distance matrix (None in lossless mode)."""

    def models(self, group: int) -> set[int]:
        return {i // self.num_experts for i in self.groups[group]}

    def group_distance(self) -> np.ndarray:
        """Group x group distances, +inf where two groups hold experts of the same model."""
        assert self.distance is not None
        heads = [g[0] for g in self.groups]
        d = self.distance[np.ix_(heads, heads)].astype(np.float64)
        models = [self.models(g) for g in range(len(self.groups))]
        for a in range(len(models)):
            for b in range(len(models)):
                if a == b or models[a] & models[b]:
                    d[a, b] = np.inf
        return d


def identical_groups(
    layer: str, digests: list[str], num_experts: int, distance: np.ndarray | None = None
) -> LayerGroups:
    """Collapse items with equal digests into groups, in order of first appearance."""
    by_digest: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
        by_digest.setdefault(digest, []).append(i)
    return LayerGroups(layer, num_experts, list(by_digest.values()), distance)


def _expand(lg: LayerGroups, clusters_of_groups: list[list[int]]) -> list[list[int]]:
    """Clusters of items, each sorted, ordered by their first item."""
    clusters = [sorted(i for g in c for i in lg.groups[g]) for c in clusters_of_groups]
    return sorted(clusters, key=lambda c: c[0])


def cluster_lossless(lg: LayerGroups) -> list[list[int]]:
    return _expand(lg, [[g] for g in range(len(lg.groups))])


def cluster_threshold(lg: LayerGroups, cutoff: float) -> list[list[int]]:
    """Complete-linkage clusters whose members are all pairwise within `cutoff` distance."""
    from scipy.cluster.hierarchy import fcluster, linkage  # scipy when first clustering: start-up time
    from scipy.spatial.distance import squareform

    n = len(lg.groups)
    if n == 1:
        return _expand(lg, [[0]])
    d = lg.group_distance()
    finite = d[np.isfinite(d)]
    big = 2.0 * max(cutoff, float(finite.max()) if finite.size else 0.0) + 1.0
    d = np.where(np.isfinite(d), d, big)
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="complete")
    labels = fcluster(z, t=cutoff, criterion="distance")
    clusters: dict[int, list[int]] = {}
    for g, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(g)
    return _expand(lg, list(clusters.values()))


def cluster_budget(layers: list[LayerGroups], max_bank: int) -> list[list[list[int]]]:
    """Merge the closest pair of clusters over all layers (complete linkage) until the total
    bank has at most `max_bank` experts (`reduce_to_budget`). Raises if no clustering that
    honours the same-model rule is that small."""
    return reduce_to_budget(layers, [CompleteLinkage(lg) for lg in layers], max_bank)


def choose_representative(cluster: list[int], rule: str, digests: list[str], distance: np.ndarray | None) -> int | None:
    """The member stored for a cluster, or None for a computed mean.

    `first`: the member of the lowest model index (then expert index). `medoid`: the member
    with the smallest sum of distances to the other members (ties: the first). `mean`: the
    element-wise mean of all members (one per slot), computed when writing. A cluster whose
    members are all bit-identical always stores its first member, whatever the rule.
    """
    if rule not in REPRESENTATIVES:
        raise SettingsError(f"unknown `representative` {rule!r}: choose from {', '.join(REPRESENTATIVES)}")
    if len({digests[i] for i in cluster}) == 1 or rule == "first":
        return cluster[0]
    if rule == "mean":
        return None
    assert distance is not None
    sums = distance[np.ix_(cluster, cluster)].sum(axis=1)
    return cluster[int(np.argmin(sums))]


# -- calibrated budget: output error on each variant's own tokens ---------------------------


def cluster_cost(items: list[int], cost: np.ndarray) -> tuple[float, int]:
    """(cost, representative) of serving all `items` by one member: the member r with the
    least sum_i cost[i, r] (ties: the first)."""
    sums = cost[np.ix_(items, items)].sum(axis=0)
    r = int(np.argmin(sums))
    return float(sums[r]), items[r]


def cluster_calibrated(
    layers: list[LayerGroups], costs: list[np.ndarray], max_bank: int, tie_weight: float = 1e-6
) -> list[list[list[int]]]:
    """Greedy over all layers: apply the merge of two clusters that adds the least
    substitution cost (`calibration.substitution_costs`, each cluster served by its
    least-cost member), until the bank has at most `max_bank` experts (`reduce_to_budget`).

    The rule that two different experts of one model never share holds as in budget mode.
    `tie_weight` x the clusters' weight distance is added to every merge's cost, so merges
    the calibration cannot tell apart (slots no token reached) go to the most alike experts.
    """
    return reduce_to_budget(layers, [CalibratedLinkage(lg, c, tie_weight) for lg, c in zip(layers, costs)], max_bank)


# -- fairness between models -----------------------------------------------------------------

FAIRNESS_ROUNDS = 6
"""Rounds of reweighting in `fair_weights` (1: every model weighs 1, the least total cost)."""


def _owners(lg: LayerGroups, cost: np.ndarray) -> np.ndarray:
    return np.arange(cost.shape[0]) // lg.num_experts


def model_costs(
    layers: list[LayerGroups],
    costs: list[np.ndarray],
    clusters: list[list[list[int]]],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Each model's summed substitution cost over all layers when every cluster (of item
    indices) is served by its least-cost member: least under the cost rows scaled by
    `weights` (one per model) if given; the costs summed are the unscaled ones."""
    n_models = max(i for lg in layers for g in lg.groups for i in g) // layers[0].num_experts + 1
    total = np.zeros(n_models)
    for lg, cost, cs in zip(layers, costs, clusters):
        owner = _owners(lg, cost)
        scaled = cost if weights is None else cost * weights[owner][:, None]
        for c in cs:
            r = cluster_cost(c, scaled)[1]
            np.add.at(total, owner[c], cost[c, r])
    return total


def fair_weights(
    layers: list[LayerGroups], costs: list[np.ndarray], max_bank: int, rounds: int = FAIRNESS_ROUNDS
) -> np.ndarray:
    """One weight per model for its substitution costs, so that calibrated clustering does
    not put most of the cost on one model.

    Why: `cluster_calibrated` minimises the total cost over models, which may all fall on
    one of them; measured on the first example family, the variant with the largest summed
    cost is the one that keeps the least of its gain. The weights are found by rerunning
    the clustering with each model's cost rows scaled by its weight, multiplied after each
    round by a damped share of the cost that model carried (0.5 + 0.5 x cost / mean cost;
    multiplicative weights, normalised to mean 1); the weights of the round whose
    clustering has the least sum of squared per-model costs (`model_costs`, unscaled) are
    returned: the total when costs are even, more the more one model carries. Round 1 has
    every weight 1, so the result is never worse than least total cost in that measure.
    """
    n_models = max(i for lg in layers for g in lg.groups for i in g) // layers[0].num_experts + 1
    weights = np.ones(n_models)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(max(1, rounds)):
        scaled = [c * weights[_owners(lg, c)][:, None] for lg, c in zip(layers, costs)]
        per_model = model_costs(layers, costs, cluster_calibrated(layers, scaled, max_bank), weights)
        score = float((per_model**2).sum())
        if best is None or score < best[0]:
            best = (score, weights)
        mean = float(per_model.mean())
        if mean <= 0:
            break
        weights = weights * (0.5 + 0.5 * per_model / mean)  # multiplicative: a model that keeps carrying gains
        weights = weights / weights.mean()
    assert best is not None
    return best[1]


# -- one mechanism for both budgeted modes: greedy merging, and packing when it is stuck ----


class Linkage:
    """How the clusters of one layer are priced; a cluster is a list of group indices.

    `merge_cost(a, b)`: the price of joining clusters a and b (the greedy takes the least).
    `cost(c)`: the price of one cluster as it stands (0 for one group). The same-model rule
    is not theirs to enforce: `reduce_to_budget` and `pack` mask every pair that breaks it.
    """

    def __init__(self, lg: LayerGroups):
        self.lg = lg

    def merge_cost(self, a: list[int], b: list[int]) -> float:
        raise NotImplementedError

    def cost(self, c: list[int]) -> float:
        raise NotImplementedError

    def table(self, clusters: list[list[int]]) -> np.ndarray:
        """k x k merge costs, upper triangle (a < b) filled, +inf elsewhere."""
        k = len(clusters)
        d = np.full((k, k), np.inf)
        models = [_models(self.lg, c) for c in clusters]
        for a in range(k):
            for b in range(a + 1, k):
                if not models[a] & models[b]:
                    d[a, b] = self.merge_cost(clusters[a], clusters[b])
        return d

    def merged_row(self, clusters: list[list[int]], d: np.ndarray, a: int, b: int) -> np.ndarray:
        """Merge costs between cluster a (now holding b's groups too) and every cluster, with
        `d` the table before the merge (b still in it); entry a is ignored."""
        mine = _models(self.lg, clusters[a])
        return np.array(
            [
                np.inf
                if c in (a, b) or mine & _models(self.lg, clusters[c])
                else self.merge_cost(clusters[a], clusters[c])
                for c in range(len(clusters))
            ]
        )


class CompleteLinkage(Linkage):
    """Budget mode: the distance between two clusters is the largest distance between their
    members (complete linkage); a cluster costs its diameter."""

    def __init__(self, lg: LayerGroups):
        super().__init__(lg)
        heads = [g[0] for g in lg.groups]
        self.d = lg.distance[np.ix_(heads, heads)].astype(np.float64)

    def merge_cost(self, a: list[int], b: list[int]) -> float:
        return float(self.d[np.ix_(a, b)].max())

    def cost(self, c: list[int]) -> float:
        return float(self.d[np.ix_(c, c)].max())

    def table(self, clusters: list[list[int]]) -> np.ndarray:
        if all(len(c) == 1 for c in clusters):  # the start: one group per cluster
            idx = [c[0] for c in clusters]
            return np.triu(self.d[np.ix_(idx, idx)], 1) + np.tril(np.full((len(idx),) * 2, np.inf))
        return super().table(clusters)

    def merged_row(self, clusters: list[list[int]], d: np.ndarray, a: int, b: int) -> np.ndarray:
        full = np.minimum(d, d.T)  # symmetric view of the upper triangle
        return np.maximum(full[a], full[b])  # Lance-Williams update for complete linkage


class CalibratedLinkage(Linkage):
    """Calibrated mode: a cluster costs the substitution cost of serving all its members by
    its least-cost member; a merge costs what it adds, plus `tie_weight` x the largest weight
    distance between the two clusters (so ties go to the most alike experts)."""

    def __init__(self, lg: LayerGroups, cost: np.ndarray, tie_weight: float = 1e-6):
        super().__init__(lg)
        self.matrix = cost
        self.tie_weight = tie_weight
        self._cache: dict[tuple[int, ...], float] = {}

    def items(self, c: list[int]) -> list[int]:
        return [i for g in c for i in self.lg.groups[g]]

    def cost(self, c: list[int]) -> float:
        key = tuple(sorted(c))
        if key not in self._cache:
            self._cache[key] = cluster_cost(self.items(c), self.matrix)[0]
        return self._cache[key]

    def merge_cost(self, a: list[int], b: list[int]) -> float:
        added = self.cost(a + b) - self.cost(a) - self.cost(b)
        tie = 0.0
        if self.lg.distance is not None:
            tie = self.tie_weight * float(self.lg.distance[np.ix_(self.items(a), self.items(b))].max())
        return added + tie


def _models(lg: LayerGroups, c: list[int]) -> set[int]:
    return {m for g in c for m in lg.models(g)}


def pack(lg: LayerGroups, linkage: Linkage, target: int | None = None) -> list[list[int]]:
    """Clusters of groups for one layer built by sequential assignment: as few as the
    same-model rule allows, then (with `target`) split back up to `target` clusters.

    Models are taken in order of how many groups they hold (most first; ties: lowest index).
    The first model's groups open the clusters; each further model's groups not yet placed
    are assigned to the clusters at once by `scipy.optimize.linear_sum_assignment`: a
    group may join a cluster that holds none of its models, at `linkage.merge_cost`, or open
    a new cluster at a price above any sum of joins, so new clusters open only when the rule
    forces them. When every group holds one model (no experts bit-identical across models)
    this reaches the floor exactly: the most groups any one model has (E when its experts
    all differ). Splitting then takes out, one at a time, the group whose join costs most.
    """
    from scipy.optimize import linear_sum_assignment  # scipy when first packing: start-up time

    n_models = 1 + max(i for g in lg.groups for i in g) // lg.num_experts
    per_model = [[g for g in range(len(lg.groups)) if m in lg.models(g)] for m in range(n_models)]
    order = sorted(range(n_models), key=lambda m: (-len(per_model[m]), m))
    clusters: list[list[int]] = []
    placed: set[int] = set()
    for m in order:
        new = [g for g in per_model[m] if g not in placed]
        if not new:
            continue
        k = len(clusters)
        joins = np.full((len(new), k), np.inf)
        for r, g in enumerate(new):
            for c in range(k):
                if not lg.models(g) & _models(lg, clusters[c]):
                    joins[r, c] = linkage.merge_cost(clusters[c], [g])
        finite = joins[np.isfinite(joins)]
        opening = 1.0 + 2.0 * float(np.abs(finite).sum()) if finite.size else 1.0
        price = np.hstack([joins, np.full((len(new), len(new)), opening)])
        rows, cols = linear_sum_assignment(price)
        for r, c in zip(rows, cols):
            if c < k:
                clusters[c] = clusters[c] + [new[r]]
            else:
                clusters.append([new[r]])
        placed.update(new)
    while target is not None and len(clusters) < target:
        best = None
        for c, members in enumerate(clusters):
            if len(members) < 2:
                continue
            for g in members:
                saving = linkage.merge_cost([h for h in members if h != g], [g])
                if best is None or saving > best[0]:
                    best = (saving, c, g)
        if best is None:
            break
        _, c, g = best
        clusters[c] = [h for h in clusters[c] if h != g]
        clusters.append([g])
    return clusters


def reduce_to_budget(layers: list[LayerGroups], linkages: list[Linkage], max_bank: int) -> list[list[list[int]]]:
    """Cluster every layer so that the bank has at most `max_bank` experts in all.

    Greedy: start from the identical groups and apply the cheapest merge over all layers
    (`Linkage.merge_cost`) until the bank fits. Merging two clusters is refused when both
    hold experts of one model, so the greedy can get stuck above the budget: every pair of
    clusters left in every layer shares a model (e.g. {a0, b0}, {a1, c0}, {b1, c1}), though a
    different grouping ({a0, b0, c0}, {a1, b1, c1}) would be smaller. Then one layer is
    rebuilt by `pack` (sequential assignment) with just as many clusters as the budget still
    needs removed (never fewer than its floor): the layer whose rebuilt clustering adds the
    least cost (`Linkage.cost`) per bank expert saved; the greedy then goes on. Only when
    no layer can be packed any smaller does it raise. Every layer that ends at its floor
    keeps whichever of the two clusterings (greedy or `pack`) costs less in all.
    """
    state = []
    for lg, link in zip(layers, linkages):
        clusters = [[g] for g in range(len(lg.groups))]
        state.append({"clusters": clusters, "d": _masked(lg, clusters, link.table(clusters))})
    floors: dict[int, list[list[int]]] = {}
    total = sum(len(s["clusters"]) for s in state)
    while total > max_bank:
        mins = [float(s["d"].min()) if s["d"].size else np.inf for s in state]
        li = int(np.argmin(mins))
        if np.isfinite(mins[li]):
            s, lg, link = state[li], layers[li], linkages[li]
            a, b = np.unravel_index(int(np.argmin(s["d"])), s["d"].shape)
            a, b = int(min(a, b)), int(max(a, b))
            s["clusters"][a] = s["clusters"][a] + s["clusters"][b]
            row = link.merged_row(s["clusters"], s["d"], a, b)
            del s["clusters"][b]
            row = np.delete(row, b)
            d = np.delete(np.delete(s["d"], b, axis=0), b, axis=1)
            for c in range(len(s["clusters"])):
                if c != a:
                    conflict = bool(_models(lg, s["clusters"][a]) & _models(lg, s["clusters"][c]))
                    d[min(a, c), max(a, c)] = np.inf if conflict else row[c]
            s["d"] = d
            total -= 1
            continue
        best = None
        for li, (lg, link, s) in enumerate(zip(layers, linkages, state)):
            if li not in floors:
                floors[li] = pack(lg, link)
            now = len(s["clusters"])
            if len(floors[li]) >= now:
                continue
            target = max(len(floors[li]), now - (total - max_bank))
            packed = pack(lg, link, target)
            added = sum(link.cost(c) for c in packed) - sum(link.cost(c) for c in s["clusters"])
            per_expert = added / (now - len(packed))
            if best is None or per_expert < best[0]:
                best = (per_expert, li, packed)
        if best is None:
            raise SettingsError(
                f"budget cannot be met: sharing stops at {total} bank experts, because two different experts "
                f"of the same model never share; give a `budget` of at least {total} experts"
            )
        _, li, packed = best
        total += len(packed) - len(state[li]["clusters"])
        state[li] = {"clusters": packed, "d": _masked(layers[li], packed, linkages[li].table(packed))}
    for li, (lg, link, s) in enumerate(zip(layers, linkages, state)):
        # at the floor, keep whichever of the greedy's and the assignment's clusterings costs less
        if len(s["clusters"]) != _most_groups_of_one_model(lg) or len(s["clusters"]) == len(lg.groups):
            continue  # not at the floor (the most groups one model holds is a lower bound)
        floor = floors[li] if li in floors else pack(lg, link)
        if len(floor) == len(s["clusters"]):
            if sum(link.cost(c) for c in floor) < sum(link.cost(c) for c in s["clusters"]):
                s["clusters"] = floor
    return [_expand(lg, s["clusters"]) for lg, s in zip(layers, state)]


def _most_groups_of_one_model(lg: LayerGroups) -> int:
    counts: dict[int, int] = {}
    for g in range(len(lg.groups)):
        for m in lg.models(g):
            counts[m] = counts.get(m, 0) + 1
    return max(counts.values())


def _masked(lg: LayerGroups, clusters: list[list[int]], d: np.ndarray) -> np.ndarray:
    """The table with +inf for every pair of clusters that share a model (and below the diagonal)."""
    d = d.copy()
    models = [_models(lg, c) for c in clusters]
    for a in range(len(clusters)):
        d[a, : a + 1] = np.inf
        for b in range(a + 1, len(clusters)):
            if models[a] & models[b]:
                d[a, b] = np.inf
    return d
