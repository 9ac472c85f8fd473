"""Calibrated clustering's fairness between models (clustering.fair_weights, model_costs).

The least total substitution cost can put all of it on one model; fair_weights rescales
each model's costs by its share, round by round, and keeps the weights whose clustering has
the least sum of squared per-model costs. Checked on a layer whose answer is worked out by hand, and model_costs against a
direct loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeconsol.consolidate.grouping import cluster_calibrated, fair_weights, identical_groups, model_costs

E, N = 2, 3  # items: a0 a1 b0 b1 c0 c1 = 0 1 2 3 4 5


def one_sided_layer() -> tuple:
    """Two cheap merges, {a0, b0} and {a1, c1}; each is cheapest served by the other model's
    expert, so model a pays for both (2.0); served by a's experts, b and c pay 1.1 each."""
    cost = np.full((N * E, N * E), 10.0)
    np.fill_diagonal(cost, 0.0)
    cost[0, 2], cost[2, 0] = 1.0, 1.1  # serve a0 by b0: 1.0 (paid by a); b0 by a0: 1.1 (paid by b)
    cost[1, 5], cost[5, 1] = 1.0, 1.1
    lg = identical_groups("l", [f"d{i}" for i in range(N * E)], E, np.zeros((N * E, N * E)))
    return lg, cost


def test_least_total_cost_puts_it_on_one_model_and_fair_weights_spread_it():
    lg, cost = one_sided_layer()
    plain = cluster_calibrated([lg], [cost], 4)
    assert sorted(map(sorted, plain[0])) == [[0, 2], [1, 5], [3], [4]]
    assert model_costs([lg], [cost], plain).tolist() == pytest.approx([2.0, 0.0, 0.0])
    # round 1: a pays 2.0 (mean 2/3) -> weights 0.5 + 0.5 * share = [2, 0.5, 0.5]; round 2
    # serves both merges by a's experts: b and c pay 1.1 each, 2.42 < 4 squared
    weights = fair_weights([lg], [cost], 4)
    assert weights.tolist() == pytest.approx([2.0, 0.5, 0.5])
    fair = cluster_calibrated([lg], [cost * np.repeat(weights, E)[:, None]], 4)
    assert sorted(map(sorted, fair[0])) == [[0, 2], [1, 5], [3], [4]]  # the same merges ...
    assert model_costs([lg], [cost], fair, weights).tolist() == pytest.approx([0.0, 1.1, 1.1])  # ... served by a's
    assert fair_weights([lg], [cost], 4, rounds=1).tolist() == [1.0, 1.0, 1.0]


def test_fair_weights_never_do_worse_than_least_total_cost_in_their_own_measure():
    rng = np.random.default_rng(3)
    layers, costs = [], []
    for i in range(3):
        layers.append(identical_groups(f"l{i}", [f"{i}-{j}" for j in range(4 * 4)], 4, rng.random((16, 16))))
        c = rng.exponential(size=(16, 16)) * (1 - np.eye(16))
        c[:4] *= 5.0  # model 0's experts are costly to replace
        costs.append(c)
    for budget in (40, 24, 12):
        plain = model_costs(layers, costs, cluster_calibrated(layers, costs, budget))
        w = fair_weights(layers, costs, budget)
        fair = model_costs(
            layers, costs, cluster_calibrated(layers, [c * np.repeat(w, 4)[:, None] for c in costs], budget), w
        )
        assert (fair**2).sum() <= (plain**2).sum() + 1e-12


def test_weighted_layer_costs_scale_rows_and_norm_alike():
    from moeconsol.analysis.calibration import LayerCosts

    cost = np.arange(36, dtype=float).reshape(6, 6)
    lc = LayerCosts(cost, np.ones(6), np.array([2.0, 4.0, 8.0]))
    w = lc.weighted(np.array([1.0, 3.0, 0.5]))
    assert w.cost.tolist() == (cost * np.array([1, 1, 3, 3, 0.5, 0.5])[:, None]).tolist()
    assert w.norm.tolist() == [2.0, 4.0 / 3.0, 16.0]  # a cost divided by the norm scales by the weight
    assert w.usage.tolist() == lc.usage.tolist()


def test_model_costs_against_a_direct_loop():
    rng = np.random.default_rng(0)
    lg = identical_groups("l", [f"d{i}" for i in range(6)], E, rng.random((6, 6)))
    cost = rng.random((6, 6)) * (1 - np.eye(6))
    clusters = [[[0, 3, 4], [1, 2], [5]]]
    weights = np.array([1.0, 3.0, 0.5])
    want = np.zeros(N)
    for c in clusters[0]:
        # the member that serves c: least weighted sum of its members' costs
        r = min(c, key=lambda j: sum(weights[i // E] * cost[i, j] for i in c))
        for i in c:
            want[i // E] += cost[i, r]
    assert model_costs([lg], [cost], clusters, weights).tolist() == pytest.approx(want.tolist())
