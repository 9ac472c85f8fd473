"""Grouping the experts of a layer, across models and expert indices, into a shared bank.

Every expert of one MoE layer is an *item*: flat index `model_index * E + expert_index`,
the same numbering as `similarity.layer_similarity`. Clustering works on *groups*:
bit-identical items (equal sha256) are collapsed first, because they may always share.
Two groups that hold experts of the same model never join one cluster in the lossy modes:
that model's router must still be able to tell its experts apart.

Modes:
- lossless:  the clusters are exactly the identical groups.
- threshold: complete-linkage hierarchical clustering (scipy) cut at the threshold, so every
  pair of members (hence every member and a member representative) is within it.
- budget:    the same complete linkage, run greedily over *all* layers at once: the closest
  pair of clusters anywhere is merged first, until the total bank fits.

Similarities are turned into distances (`1 - s` for cosine and CKA); a cosine threshold of
1.0 is a distance of 0, which only bit-identical experts have, so it equals lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MoeconsolError
from .similarity import DISTANCE_METRICS, METRICS

MODES = ("lossless", "threshold", "budget")
REPRESENTATIVES = ("medoid", "first", "mean", "best")
"""best: calibrated mode only, the least-cost member or the usage-weighted mean, whichever costs less."""


def to_distance(matrix: np.ndarray, metric: str) -> np.ndarray:
    """Distance (0 = identical, larger = less alike) from a metric matrix."""
    d = matrix if metric in DISTANCE_METRICS else 1.0 - matrix
    return np.clip(d, 0.0, None)


def threshold_to_distance(metric: str, threshold: float) -> float:
    """The distance cut for a threshold, refusing one outside the metric's range."""
    if metric not in METRICS:
        raise MoeconsolError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}")
    if metric in DISTANCE_METRICS:
        high = 2.0 if metric == "relative-l2" else float("inf")
        if not 0.0 <= threshold <= high:
            raise MoeconsolError(
                f"threshold {threshold} out of range for {metric}: a distance, give a value from 0 "
                f"{'to 2' if metric == 'relative-l2' else 'up'} (0 = share only bit-identical experts)"
            )
        return float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise MoeconsolError(
            f"threshold {threshold} out of range for {metric}: a similarity, give a value from -1 to 1 "
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


def identical_groups(layer: str, digests: list[str], num_experts: int, distance: np.ndarray | None = None) -> LayerGroups:
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
    from scipy.cluster.hierarchy import fcluster, linkage
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
    bank has at most `max_bank` experts. Raises if merging stops above that."""
    state = []
    for lg in layers:
        d = lg.group_distance()
        state.append({"clusters": [[g] for g in range(len(lg.groups))], "d": d})
    total = sum(len(s["clusters"]) for s in state)
    mins = [float(s["d"].min()) if s["d"].size else np.inf for s in state]
    while total > max_bank:
        li = int(np.argmin(mins))
        if not np.isfinite(mins[li]):
            raise MoeconsolError(
                f"budget cannot be met: sharing stops at {total} bank experts, because two different experts "
                f"of the same model never share; give a budget of at least {total} experts"
            )
        s = state[li]
        d = s["d"]
        a, b = np.unravel_index(int(np.argmin(d)), d.shape)
        a, b = int(min(a, b)), int(max(a, b))
        row = np.maximum(d[a], d[b])
        d[a, :], d[:, a] = row, row
        d[a, a] = np.inf
        keep = [i for i in range(d.shape[0]) if i != b]
        s["d"] = d[np.ix_(keep, keep)]
        s["clusters"][a] += s["clusters"][b]
        del s["clusters"][b]
        mins[li] = float(s["d"].min()) if s["d"].size else np.inf
        total -= 1
    return [_expand(lg, s["clusters"]) for lg, s in zip(layers, state)]


def choose_representative(cluster: list[int], rule: str, digests: list[str], distance: np.ndarray | None) -> int | None:
    """The member stored for a cluster, or None for a computed mean.

    `first`: the member of the lowest model index (then expert index). `medoid`: the member
    with the smallest sum of distances to the other members (ties: the first). `mean`: the
    element-wise mean of all members (one per slot), computed when writing. A cluster whose
    members are all bit-identical always stores its first member, whatever the rule.
    """
    if rule not in REPRESENTATIVES:
        raise MoeconsolError(f"unknown representative rule {rule!r}: choose from {', '.join(REPRESENTATIVES)}")
    if len({digests[i] for i in cluster}) == 1 or rule == "first":
        return cluster[0]
    if rule == "mean":
        return None
    assert distance is not None
    sums = distance[np.ix_(cluster, cluster)].sum(axis=1)
    return cluster[int(np.argmin(sums))]


def slot_maps(clusters: list[list[int]], num_models: int, num_experts: int) -> list[list[int]]:
    """For each model, expert index -> bank index."""
    maps = [[-1] * num_experts for _ in range(num_models)]
    for k, cluster in enumerate(clusters):
        for i in cluster:
            maps[i // num_experts][i % num_experts] = k
    assert all(k >= 0 for m in maps for k in m)
    return maps


# -- calibrated budget: output error on each variant's own tokens ---------------------------


def cluster_cost(items: list[int], cost: np.ndarray) -> tuple[float, int]:
    """(cost, representative) of serving all `items` by one member: the member r with the
    least sum_i cost[i, r] (ties: the first)."""
    sums = cost[np.ix_(items, items)].sum(axis=0)
    r = int(np.argmin(sums))
    return float(sums[r]), items[r]


def cluster_calibrated(layers: list[LayerGroups], costs: list[np.ndarray], max_bank: int, tie_weight: float = 1e-6) -> list[list[list[int]]]:
    """Greedy over all layers: apply the merge of two clusters that adds the least
    substitution cost (`calibration.substitution_costs`, each cluster served by its
    least-cost member), until the bank has at most `max_bank` experts.

    The rule that two different experts of one model never share holds as in budget mode.
    `tie_weight` x the clusters' weight distance is added to every merge's cost, so merges
    the calibration cannot tell apart (slots no token reached) go to the most alike experts.
    """
    state = []
    for lg, cost in zip(layers, costs):
        clusters = [list(g) for g in lg.groups]
        own = [cluster_cost(c, cost)[0] for c in clusters]
        state.append({"lg": lg, "cost": cost, "clusters": clusters, "own": own})

    def delta(s: dict, a: int, b: int) -> float:
        ca, cb = s["clusters"][a], s["clusters"][b]
        if {i // s["lg"].num_experts for i in ca} & {i // s["lg"].num_experts for i in cb}:
            return np.inf
        merged = cluster_cost(ca + cb, s["cost"])[0] - s["own"][a] - s["own"][b]
        tie = 0.0
        if s["lg"].distance is not None:
            tie = tie_weight * float(s["lg"].distance[np.ix_(ca, cb)].max())
        return merged + tie

    def table(s: dict) -> np.ndarray:
        k = len(s["clusters"])
        d = np.full((k, k), np.inf)
        for a in range(k):
            for b in range(a + 1, k):
                d[a, b] = delta(s, a, b)
        return d

    for s in state:
        s["d"] = table(s)
    total = sum(len(s["clusters"]) for s in state)
    while total > max_bank:
        mins = [float(s["d"].min()) if s["d"].size else np.inf for s in state]
        li = int(np.argmin(mins))
        if not np.isfinite(mins[li]):
            raise MoeconsolError(
                f"budget cannot be met: sharing stops at {total} bank experts, because two different experts "
                f"of the same model never share; give a budget of at least {total} experts"
            )
        s = state[li]
        a, b = np.unravel_index(int(np.argmin(s["d"])), s["d"].shape)
        a, b = int(min(a, b)), int(max(a, b))
        s["clusters"][a] = s["clusters"][a] + s["clusters"][b]
        del s["clusters"][b]
        s["own"][a] = cluster_cost(s["clusters"][a], s["cost"])[0]
        del s["own"][b]
        d = np.delete(np.delete(s["d"], b, axis=0), b, axis=1)
        for c in range(len(s["clusters"])):
            if c != a:
                d[min(a, c), max(a, c)] = delta(s, min(a, c), max(a, c))
        s["d"] = d
        total -= 1
    return [sorted((sorted(c) for c in s["clusters"]), key=lambda c: c[0]) for s in state]
