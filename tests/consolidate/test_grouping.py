"""clustering.py and writer.py against hand-built cases and independent computations."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from moeconsol.artifact.builder import slot_maps
from moeconsol.consolidate.grouping import (
    CalibratedLinkage,
    CompleteLinkage,
    LayerGroups,
    choose_representative,
    cluster_budget,
    cluster_calibrated,
    cluster_cost,
    cluster_lossless,
    cluster_threshold,
    identical_groups,
    pack,
    threshold_to_distance,
    to_distance,
)
from moeconsol.errors import MoeconsolError
from moeconsol.io.sizes import parse_size
from moeconsol.io.writer import SafetensorsWriter, ShardedWriter, TensorSpec, atomic_directory, plan_shards


def random_layer(
    n_models: int, n_experts: int, seed: int, identical: list[tuple[int, int]] = ()
) -> tuple[np.ndarray, list[str]]:
    """Item distance matrix of random points and digests; `identical` pairs share a point."""
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n_models * n_experts, 5))
    digests = [f"d{i}" for i in range(len(points))]
    for a, b in identical:
        points[b] = points[a]
        digests[b] = digests[a]
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    return d, digests


def same_model_conflict(cluster: list[int], digests: list[str], E: int) -> bool:
    return any(a // E == b // E and digests[a] != digests[b] for a, b in itertools.combinations(cluster, 2))


def test_identical_groups_and_lossless():
    lg = identical_groups("l", ["a", "b", "a", "c", "b", "a"], 3)
    assert lg.groups == [[0, 2, 5], [1, 4], [3]]
    assert cluster_lossless(lg) == [[0, 2, 5], [1, 4], [3]]
    assert slot_maps(cluster_lossless(lg), 2, 3) == [[0, 1, 0], [2, 1, 0]]


@pytest.mark.parametrize("seed", range(5))
def test_threshold_clusters_are_within_cutoff_and_never_join_one_models_experts(seed):
    E = 4
    d, digests = random_layer(3, E, seed, identical=[(0, 4), (5, 9)])
    lg = identical_groups("l", digests, E, d)
    cutoff = float(np.quantile(d[d > 0], 0.4))
    clusters = cluster_threshold(lg, cutoff)
    assert sorted(i for c in clusters for i in c) == list(range(3 * E))
    for c in clusters:
        assert max(d[a, b] for a in c for b in c) <= cutoff
        assert not same_model_conflict(c, digests, E)
    # items 0 and 4 are identical: always together
    assert any({0, 4} <= set(c) for c in clusters)


def test_threshold_zero_distance_equals_lossless():
    d, digests = random_layer(3, 4, 0, identical=[(0, 4), (1, 9), (2, 10)])
    lg = identical_groups("l", digests, 4, d)
    assert cluster_threshold(lg, threshold_to_distance("cosine", 1.0)) == cluster_lossless(lg)
    assert cluster_threshold(lg, threshold_to_distance("l2", 0.0)) == cluster_lossless(lg)


def test_threshold_range_is_checked():
    assert threshold_to_distance("cosine", 0.9) == pytest.approx(0.1)
    assert threshold_to_distance("l2", 3.0) == 3.0
    for metric, bad in [("cosine", 1.5), ("cka", -2.0), ("l2", -0.1), ("relative-l2", 2.5)]:
        with pytest.raises(MoeconsolError, match="out of range"):
            threshold_to_distance(metric, bad)
    with pytest.raises(MoeconsolError, match="unknown `metric`"):
        threshold_to_distance("euclid", 0.5)


def test_to_distance():
    m = np.array([[1.0, 0.25], [0.25, 1.0]])
    assert np.array_equal(to_distance(m, "cosine"), np.array([[0.0, 0.75], [0.75, 0.0]]))
    assert np.array_equal(to_distance(m, "l2"), m)


def test_budget_merges_the_closest_pair_over_all_layers_first():
    # two layers, 2 models x 2 experts; the closest cross-model pair is in layer 1 (items 1, 3)
    d0 = np.array([[0, 9, 5, 8], [9, 0, 7, 6], [5, 7, 0, 9], [8, 6, 9, 0]], float)
    d1 = np.array([[0, 9, 4, 8], [9, 0, 7, 1], [4, 7, 0, 9], [8, 1, 9, 0]], float)
    layers = [LayerGroups(f"l{i}", 2, [[0], [1], [2], [3]], d) for i, d in enumerate((d0, d1))]
    one = cluster_budget(layers, 7)
    assert one == [[[0], [1], [2], [3]], [[0], [1, 3], [2]]]
    two = cluster_budget(layers, 6)
    assert two == [[[0], [1], [2], [3]], [[0, 2], [1, 3]]]
    three = cluster_budget(layers, 5)
    assert three[0] == [[0, 2], [1], [3]]
    assert cluster_budget(layers, 4) == [[[0, 2], [1, 3]], [[0, 2], [1, 3]]]
    # two experts of one model never share: 3 bank experts per layer is impossible
    with pytest.raises(MoeconsolError, match="budget cannot be met"):
        cluster_budget(layers, 3)


@pytest.mark.parametrize("seed", range(3))
def test_budget_honoured_without_conflicts(seed):
    E = 4
    layers = []
    for i in range(3):
        d, digests = random_layer(3, E, seed * 10 + i)
        layers.append(identical_groups(f"l{i}", digests, E, d))
    clusters = cluster_budget(layers, 20)
    assert sum(len(c) for c in clusters) == 20
    for _lg, cs in zip(layers, clusters):
        assert sorted(i for c in cs for i in c) == list(range(3 * E))
        for c in cs:
            assert not same_model_conflict(c, [f"{i}" for i in range(12)], E)


def stuck_layer() -> LayerGroups:
    """3 models x 2 experts (items a0 a1 b0 b1 c0 c1 = 0..5) where closest-first merging
    joins {a0, b0}, {a1, c0}, {b1, c1} and then every pair of clusters shares a model, though
    two clusters ({a0, b0, c*}, {a1, b1, c*}) honour the same-model rule."""
    d = np.full((6, 6), 10.0)
    np.fill_diagonal(d, 0.0)
    for (i, j), v in {(0, 2): 1.0, (1, 4): 2.0, (3, 5): 3.0}.items():
        d[i, j] = d[j, i] = v
    return LayerGroups("l", 2, [[i] for i in range(6)], d)


def check_clustering(clusters: list[list[int]], n_models: int, E: int, digests: list[str]) -> None:
    """Every item once, no two different experts of one model together, valid slot maps."""
    assert sorted(i for c in clusters for i in c) == list(range(n_models * E))
    assert not any(same_model_conflict(c, digests, E) for c in clusters)
    maps = slot_maps(clusters, n_models, E)
    for m, sm in enumerate(maps):
        assert all(0 <= k < len(clusters) and m * E + e in clusters[k] for e, k in enumerate(sm))


@pytest.mark.parametrize("mode", ["budget", "calibrated"])
def test_stuck_greedy_is_packed_to_the_floor_exactly(mode):
    lg = stuck_layer()
    run = (
        (lambda layers, n: cluster_budget(layers, n))
        if mode == "budget"
        else (lambda layers, n: cluster_calibrated(layers, [x.distance for x in layers], n))
    )
    digests = [str(i) for i in range(6)]
    # the greedy alone stops here: three clusters, every pair sharing a model
    assert run([lg], 3) == [[[0, 2], [1, 4], [3, 5]]]
    two = run([lg], 2)[0]
    assert len(two) == 2 and all(len(c) == 3 for c in two)
    check_clustering(two, 3, 2, digests)
    assert [0, 2] == [i for i in two[0] if i < 4]  # the closest pair (a0, b0) stays together
    # budget is global: two stuck layers and room for 5 -> one layer packed, one left at 3
    both = run([stuck_layer(), stuck_layer()], 5)
    assert sorted(len(c) for c in both) == [2, 3]
    assert [len(c) for c in run([stuck_layer(), stuck_layer()], 4)] == [2, 2]
    with pytest.raises(MoeconsolError, match="budget cannot be met"):
        run([lg], 1)


@pytest.mark.parametrize("seed", range(4))
def test_pack_reaches_the_floor_on_random_layers(seed):
    n_models, E = 4, 4
    d, digests = random_layer(n_models, E, seed, identical=[(0, 5)])  # a0 == b1: one group
    lg = identical_groups("l", digests, E, d)
    floor = pack(lg, CompleteLinkage(lg))
    assert len(floor) == E
    clusters = [sorted(i for g in c for i in lg.groups[g]) for c in floor]
    check_clustering(clusters, n_models, E, digests)
    assert any({0, 5} <= set(c) for c in clusters)
    # split back up to a target: exactly that many, still valid
    nine = [sorted(i for g in c for i in lg.groups[g]) for c in pack(lg, CompleteLinkage(lg), 9)]
    assert len(nine) == 9
    check_clustering(nine, n_models, E, digests)
    # and the budget reaches the floor over three such layers, whatever the greedy did
    layers = []
    for i in range(3):
        di, names = random_layer(n_models, E, seed * 7 + i)
        layers.append(identical_groups(f"l{i}", names, E, di))
    for _lgx, cs in zip(layers, cluster_budget(layers, 3 * E)):
        assert len(cs) == E
        check_clustering(cs, n_models, E, [str(i) for i in range(n_models * E)])


@pytest.mark.parametrize("seed", range(3))
def test_calibrated_at_the_floor_costs_no_more_than_the_assignment(seed):
    n_models, E = 3, 4
    rng = np.random.default_rng(seed)
    layers, costs = [], []
    for i in range(2):
        d, digests = random_layer(n_models, E, seed * 5 + i)
        layers.append(identical_groups(f"l{i}", digests, E, d))
        costs.append(rng.exponential(size=(n_models * E, n_models * E)) * (1 - np.eye(n_models * E)))
    result = cluster_calibrated(layers, costs, 2 * E)
    for lg, cost, cs in zip(layers, costs, result):
        assert len(cs) == E
        check_clustering(cs, n_models, E, [str(i) for i in range(n_models * E)])
        total = sum(cluster_cost(c, cost)[0] for c in cs)  # least-cost member serves each cluster
        assigned = sum(
            cluster_cost([i for g in c for i in lg.groups[g]], cost)[0] for c in pack(lg, CalibratedLinkage(lg, cost))
        )
        assert total <= assigned + 1e-12


def test_representatives_against_direct_computation():
    d, digests = random_layer(3, 2, 7)
    cluster = [0, 2, 5]
    sums = {i: sum(d[i, j] for j in cluster) for i in cluster}
    assert choose_representative(cluster, "medoid", digests, d) == min(sums, key=sums.get)
    assert choose_representative(cluster, "first", digests, d) == 0
    assert choose_representative(cluster, "mean", digests, d) is None
    same = ["x"] * 6
    assert choose_representative(cluster, "mean", same, d) == 0
    with pytest.raises(MoeconsolError):
        choose_representative(cluster, "median", digests, d)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000
    assert parse_size("1.5kb") == 1500
    for bad in ("", "GB", "5XB", "-1GB", "0"):
        with pytest.raises(MoeconsolError):
            parse_size(bad)


def test_plan_shards():
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = plan_shards(specs, 80)
    assert [[s.name for s in sh] for sh in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert all(sum(s.nbytes for s in sh) <= 80 or len(sh) == 1 for sh in shards)


def test_sharded_writer_output_loads_with_safetensors_bit_exact(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(7, generator=g),
        "c": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "fused": torch.randn(2, 4, 3, generator=g),
    }
    specs = [TensorSpec.of(k, v) for k, v in tensors.items()]
    w = ShardedWriter(tmp_path, "bank", specs, 100)
    for k, v in tensors.items():
        # the fused tensor is written one row-block at a time
        w.write(k, iter(v.unbind(0)) if k == "fused" else v)
    records = w.close()
    assert sorted(os.listdir(tmp_path)) == sorted(records) == sorted(set(w.weight_map.values()))
    for file, record in records.items():
        assert (tmp_path / file).stat().st_size == record.size
    for k, v in tensors.items():
        with safe_open(tmp_path / w.weight_map[k], "pt") as f:
            assert torch.equal(f.get_tensor(k), v)


def test_writer_refuses_undeclared_or_misshaped_tensors(tmp_path: Path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2,))], {"format": "pt"})
    with pytest.raises(RuntimeError):
        w.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError):
        w.write("a", torch.zeros(3))
    w.write("a", torch.ones(2))
    w.close()
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, OSError])
def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path, exc):
    out = tmp_path / "out"
    with pytest.raises(Exception if exc is not KeyboardInterrupt else KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise exc(28, "No space left on device") if exc is OSError else exc()
    assert os.listdir(tmp_path) == []


def test_atomic_directory_force_replaces_only_when_complete(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")  # a previous artifact: --force may replace it
    with pytest.raises(MoeconsolError, match="already exists"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError
    assert os.listdir(out) == ["manifest.json"]
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert os.listdir(out) == ["new"]
    assert os.listdir(tmp_path) == ["out"]
