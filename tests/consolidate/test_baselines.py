"""baselines.py: every formula against an independently written computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from moeconsol.analysis.similarity import read_layer
from moeconsol.consolidate.baselines import (
    reference_budget_positions,
    reference_distances,
    reference_plan,
    reference_shared_positions,
    task_arithmetic,
    ties,
    trim_top_k,
    uniform_average,
)
from moeconsol.errors import MoeconsolError
from moeconsol.io.checkpoint import open_checkpoint
from moeconsol.testing import derive_variant, save_model, tiny_mixtral


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- merges


def test_uniform_average_against_numpy():
    ts = [rand(5, 7, seed=i) for i in range(3)]
    expected = np.mean([t.double().numpy() for t in ts], axis=0)
    out = uniform_average(ts)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_uniform_average_keeps_low_precision_dtype_and_accumulates_in_float32():
    ts = [rand(64, seed=i, dtype=torch.bfloat16) for i in range(4)]
    out = uniform_average(ts)
    assert out.dtype == torch.bfloat16
    exact = np.mean([t.float().numpy().astype(np.float64) for t in ts], axis=0)
    # one bf16 rounding of the exact mean: within half a bf16 ulp (2^-8 relative)
    np.testing.assert_allclose(out.double().numpy(), exact, rtol=2**-8, atol=1e-6)
    # identical inputs average to themselves, bit for bit
    assert torch.equal(uniform_average([ts[0]] * 3), ts[0])


def test_task_arithmetic_against_numpy():
    base = rand(4, 6, seed=10)
    ts = [rand(4, 6, seed=i) for i in range(3)]
    b = base.double().numpy()
    for scale in (1.0, 0.3):
        expected = b + scale * sum(t.double().numpy() - b for t in ts)
        np.testing.assert_allclose(task_arithmetic(base, ts, scale).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_special_cases():
    base = rand(32, seed=1)
    ts = [rand(32, seed=i) for i in range(2, 5)]
    # scale 1/N is the uniform average of the fine-tunes
    torch.testing.assert_close(task_arithmetic(base, ts, 1 / 3), uniform_average(ts))
    # one fine-tune at scale 1 is that fine-tune
    torch.testing.assert_close(task_arithmetic(base, ts[:1]), ts[0])
    # disjoint changes each survive in full at the default scale
    a, c = base.clone(), base.clone()
    a[:4] += 1.0
    c[10:12] -= 2.0
    expected = base.clone()
    expected[:4] += 1.0
    expected[10:12] -= 2.0
    torch.testing.assert_close(task_arithmetic(base, [a, c]), expected)


def test_ties_hand_worked_example():
    base = torch.ones(5)
    tau1 = torch.tensor([3.0, -1.0, 0.5, -2.0, 0.0])
    tau2 = torch.tensor([-1.0, -4.0, 2.0, 0.5, 0.1])
    tau3 = torch.tensor([2.0, 1.0, -3.0, 0.2, 0.0])
    # density 0.6 -> k = ceil(0.6 * 5) = 3 entries kept per task vector:
    #   trim(tau1) = [ 3, -1,  0, -2, 0]
    #   trim(tau2) = [-1, -4,  2,  0, 0]
    #   trim(tau3) = [ 2,  1, -3,  0, 0]
    #   sum        = [ 4, -4, -1, -2, 0]  -> elected sign [+, -, -, -, 0]
    #   agreeing   = {3, 2}, {-1, -4}, {-3}, {-2}, {}  -> disjoint mean [2.5, -2.5, -3, -2, 0]
    ts = [base + tau1, base + tau2, base + tau3]
    assert torch.equal(trim_top_k(tau2, 0.6), torch.tensor([-1.0, -4.0, 2.0, 0.0, 0.0]))
    assert torch.equal(ties(base, ts, density=0.6), torch.tensor([3.5, -1.5, -2.0, -1.0, 1.0]))
    assert torch.equal(ties(base, ts, density=0.6, scale=0.5), torch.tensor([2.25, -0.25, -0.5, 0.0, 1.0]))
    # density 1 keeps everything: entry 4 has only tau2's +0.1 -> elected +, mean 0.1
    assert ties(base, ts, density=1.0)[4].item() == pytest.approx(1.1)


def test_trim_keeps_ties_at_the_threshold():
    tau = torch.tensor([1.0, -1.0, 0.5])
    # k = ceil(0.3 * 3) = 1, but both entries of magnitude 1 tie at the threshold
    assert torch.equal(trim_top_k(tau, 0.3), torch.tensor([1.0, -1.0, 0.0]))


def ties_numpy(base: np.ndarray, ts: list[np.ndarray], density: float) -> np.ndarray:
    """TIES written entry by entry, trimming with argsort."""
    k = math.ceil(density * base.size)
    trimmed = []
    for t in ts:
        tau = (t - base).reshape(-1)
        keep = np.argsort(-np.abs(tau))[:k]
        out = np.zeros_like(tau)
        out[keep] = tau[keep]
        trimmed.append(out)
    merged = np.zeros(base.size)
    for j in range(base.size):
        vals = [tr[j] for tr in trimmed]
        s = np.sign(sum(vals))
        agreeing = [v for v in vals if v != 0 and np.sign(v) == s]
        merged[j] = np.mean(agreeing) if agreeing else 0.0
    return base + merged.reshape(base.shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_against_numpy(density):
    base = rand(6, 7, seed=20)
    ts = [base + rand(6, 7, seed=i) for i in range(4)]
    expected = ties_numpy(base.double().numpy(), [t.double().numpy() for t in ts], density)
    np.testing.assert_allclose(ties(base, ts, density).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ties_bf16_round_trip_dtype():
    base = rand(16, seed=3, dtype=torch.bfloat16)
    assert ties(base, [base, base]).dtype == torch.bfloat16
    assert torch.equal(ties(base, [base, base]), base)  # no task vectors -> base, bit for bit


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: uniform_average([]), "at least one tensor"),
        (lambda: uniform_average([torch.zeros(2), torch.zeros(3)]), "different shapes"),
        (lambda: task_arithmetic(torch.zeros(2), [torch.zeros(3)]), "different shapes"),
        (lambda: ties(torch.zeros(2), [torch.zeros(2)], density=0.0), "`density` must be in"),
        (lambda: ties(torch.zeros(2), [torch.zeros(2)], density=1.5), "`density` must be in"),
    ],
)
def test_merge_errors(call, message):
    with pytest.raises(MoeconsolError, match=message):
        call()


# ---------------------------------------------------------------- reference plan


def test_reference_distances_against_direct_computation():
    parts = {"w1": (6, 4), "w2": (4, 6), "w3": (6, 4)}
    experts = [
        [{p: rand(*s, seed=100 * m + 10 * e + i) for i, (p, s) in enumerate(parts.items())} for e in range(3)]
        for m in range(3)
    ]
    experts[2][1] = {p: t.clone() for p, t in experts[0][1].items()}  # one bit-identical pair
    d = reference_distances(experts)
    for e in range(3):
        flat = [torch.cat([experts[m][e][p].reshape(-1) for p in ("w1", "w2", "w3")]).double() for m in range(3)]
        expected = sum(torch.linalg.norm(flat[a] - flat[b]).item() for a, b in itertools.combinations(range(3), 2))
        assert d[e] == pytest.approx(expected, rel=1e-12)
    assert reference_distances(experts[:1]).tolist() == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Three tiny Mixtrals: expert (0, 1) changed in one variant, (1, 3) in both, rest identical."""
    root = tmp_path_factory.mktemp("family")
    base = tiny_mixtral(seed=5)
    a = derive_variant(base, seed=1, changed_experts=[(0, 1), (1, 3)])
    b = derive_variant(base, seed=2, changed_experts=[(1, 3)])
    return [open_checkpoint(str(save_model(m, root / n))) for n, m in (("base", base), ("a", a), ("b", b))]


def test_reference_plan_on_a_family(family):
    layers = family[0].moe_layers
    distances = {layer: reference_distances(read_layer(family, layer).experts) for layer in layers}
    d0, d1 = distances[layers[0]], distances[layers[1]]
    assert d0[[0, 2, 3]].tolist() == [0.0] * 3 and d0[1] > 0
    assert d1[[0, 1, 2]].tolist() == [0.0] * 3 and d1[3] > d0[1] > 0  # (1,3) differs in 3 pairs, (0,1) in 2
    # budget 7: the 6 identical positions in row-major order, then (0, 1); round-robin over 3 models
    plan = reference_plan(distances, n_models=3, shared_positions=7)
    assert plan == {layers[0]: {0: 0, 2: 1, 3: 2, 1: 0}, layers[1]: {0: 0, 1: 1, 2: 2}}
    assert reference_plan(distances, 3, 0) == {layers[0]: {}, layers[1]: {}}
    assert sum(map(len, reference_plan(distances, 3, 100).values())) == 8


def test_reference_shared_positions_sorted_stable_and_budgeted():
    d = np.array([[0.5, 0.1, 0.9], [0.1, 0.3, 0.0]])
    assert reference_shared_positions(d, 4) == [(1, 2), (0, 1), (1, 0), (1, 1)]
    assert reference_shared_positions(d, 0) == []
    assert len(reference_shared_positions(d, 100)) == 6


def test_reference_plan_against_brute_force():
    rng = np.random.default_rng(0)
    distances = {f"layer{i}": rng.integers(0, 5, size=6).astype(float) for i in range(4)}  # many ties
    names = list(distances)
    for budget in (0, 5, 13, 24):
        ranked = sorted((distances[n][e], li, e) for li, n in enumerate(names) for e in range(6))[:budget]
        expected = {n: {} for n in names}
        for k, (_, li, e) in enumerate(ranked):
            expected[names[li]][e] = k % 3
        assert reference_plan(distances, n_models=3, shared_positions=budget) == expected


def test_reference_budget_and_errors():
    assert reference_budget_positions(10, 3) == 3
    assert reference_budget_positions(-5, 3) == 0
    with pytest.raises(MoeconsolError, match="expert size must be positive"):
        reference_budget_positions(10, 0)
    with pytest.raises(MoeconsolError, match="non-negative"):
        reference_shared_positions(np.zeros((2, 2)), -1)
    with pytest.raises(MoeconsolError, match=r"\[layers, experts\]"):
        reference_shared_positions(np.zeros(4), 1)
    with pytest.raises(MoeconsolError, match="NaN"):
        reference_shared_positions(np.array([[np.nan]]), 1)
    with pytest.raises(MoeconsolError, match="expected 3 expert distances"):
        reference_plan({"a": np.zeros(3), "b": np.zeros(2)}, 2, 1)
    with pytest.raises(MoeconsolError, match="at least one model"):
        reference_plan({"a": np.zeros(3)}, 0, 1)
    with pytest.raises(MoeconsolError, match="model 1 has 1 experts"):
        reference_distances([[{"w": torch.zeros(1)}] * 2, [{"w": torch.zeros(1)}]])
