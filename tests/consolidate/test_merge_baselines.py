"""merge --mode average|task-arithmetic|ties|reference|calibrated: the artifacts hold what the formulas say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cli_helpers import cli, one_error_line

from moeconsol.analysis.calibration import capture
from moeconsol.artifact.reader import Artifact, bank_key
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.consolidate.baselines import ties
from moeconsol.io.checkpoint import open_checkpoint, open_checkpoints
from moeconsol.testing import SAMPLE_TEXT, derive_variant, save_model, tiny_mixtral, tiny_tokenizer


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base + three fine-tunes; a and b change some experts, c changes only non-experts."""
    root = tmp_path_factory.mktemp("bl")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=5)
    save_model(base, root / "base", tok)
    save_model(derive_variant(base, 1, [(0, 1), (1, 2), (1, 0)], scale=0.05), root / "a", tok)
    save_model(derive_variant(base, 2, [(0, 1), (0, 3)], scale=0.05), root / "b", tok, fused=True)
    save_model(derive_variant(base, 3, []), root / "c", tok)
    (root / "text.txt").write_text(SAMPLE_TEXT * 3)
    return root


def models(root):
    return [f"{n}={root / n}" for n in ("a", "b", "c")]


# ---------------------------------------------------------------- merging baselines


def direct(mode: str, tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The formulas written directly in torch (float64), for average and task arithmetic."""
    ts = [t.double() for t in tensors]
    if mode == "average":
        return sum(ts) / len(ts)
    return base.double() + sum(t - base.double() for t in ts)


@pytest.mark.parametrize("mode", ["average", "task-arithmetic", "ties"])
def test_merged_artifact_holds_the_merged_tensors(family, tmp_path, mode):
    ckpts = open_checkpoints(models(family))
    base = open_checkpoint(str(family / "base"))
    s = MergeSettings(mode=mode, base=None if mode == "average" else str(family / "base"), density=0.5)
    merge(ckpts, tmp_path / "out", s)
    art = Artifact.open(tmp_path / "out")
    assert verify_artifact(tmp_path / "out") == []
    E = art.experts_per_layer
    for layer in art.layers:
        assert art.bank_size(layer) == E
        for name in art.model_names:
            assert art.slot_map(name, layer) == list(range(E))
        for e in range(E):
            for part in art.parts:
                stored = art.read(bank_key(layer, e, part))
                tensors = [c.expert_part(layer, e, part) for c in ckpts]
                b = base.expert_part(layer, e, part)
                if mode == "ties":
                    assert torch.equal(stored, ties(b, tensors, 0.5))
                else:
                    torch.testing.assert_close(stored.double(), direct(mode, tensors, b), rtol=1e-6, atol=1e-7)
    # every model maps every non-expert tensor to the same merged key
    keys = [art.non_expert_keys(n) for n in art.model_names]
    assert keys[0] == keys[1] == keys[2]
    name = "model.embed_tokens.weight"
    stored = art.read(keys[0][name])
    tensors = [c.read(name) for c in ckpts]
    if mode == "ties":
        assert torch.equal(stored, ties(base.read(name), tensors, 0.5))
    else:
        torch.testing.assert_close(stored.double(), direct(mode, tensors, base.read(name)), rtol=1e-6, atol=1e-7)
    c = art.manifest["consolidation"]
    assert c["mode"] == mode and (mode != "ties" or c["density"] == 0.5)


def test_task_arithmetic_without_base_is_refused(family, tmp_path):
    for mode in ("task-arithmetic", "ties"):
        r = cli("merge", *models(family), "-o", tmp_path / "x", "--mode", mode)
        assert r.returncode == 2
        one_error_line(r.stderr, f"--mode {mode} needs a --base")
        assert not (tmp_path / "x").exists()


def test_reference_mode_follows_the_reference_rules(family, tmp_path):
    ckpts = open_checkpoints(models(family))
    N, E, L = len(ckpts), ckpts[0].num_experts, len(ckpts[0].moe_layers)
    merge(ckpts, tmp_path / "ref", MergeSettings(mode="reference", budget="0.5"))
    art = Artifact.open(tmp_path / "ref")
    # independent distances: sum over pairs of the L2 norm of the flattened difference
    d = np.zeros((L, E))
    for li, layer in enumerate(ckpts[0].moe_layers):
        for e in range(E):
            x = [torch.cat([c.expert_part(layer, e, p).double().flatten() for p in ("w1", "w2", "w3")]) for c in ckpts]
            d[li, e] = sum(float(torch.linalg.norm(x[i] - x[j])) for i in range(N) for j in range(i + 1, N))
    budget = int(0.5 * N * L * E)
    shared = math.ceil((N * L * E - budget) / (N - 1))
    order = np.argsort(d.reshape(-1), kind="stable")[:shared]
    expected = {(int(i) // E, int(i) % E): k % N for k, i in enumerate(order)}
    assert sum(art.bank_size(layer) for layer in art.layers) == N * L * E - shared * (N - 1) <= budget
    for li, layer in enumerate(art.layers):
        for entry in art.manifest["layers"][li]["bank"]:
            members = [tuple(m) for m in entry["members"]]
            e = members[0][1]
            assert all(me == e for _, me in members)  # same index only
            if (li, e) in expected:
                assert sorted(m for m, _ in members) == list(range(N))
                assert entry["representative"] == [expected[(li, e)], e]  # round robin
            else:
                assert len(members) == 1  # kept per model
        for k, entry in enumerate(art.manifest["layers"][li]["bank"]):
            m, e = entry["representative"]
            kept = art.bank_expert(layer, k)
            own = ckpts[m].expert(layer, e)
            assert all(torch.equal(kept[p], own[p]) for p in art.parts)  # bit-identical
    # non-expert tensors stay per model
    assert len({art.non_expert_keys(n)["model.embed_tokens.weight"] for n in art.model_names}) == N


# ---------------------------------------------------------------- calibrated


def test_capture_sees_every_routed_token(family):
    ckpt = open_checkpoint(f"a={family / 'a'}")
    acts = capture(ckpt, str(family / "text.txt"), max_tokens=8)
    k = ckpt.config["num_experts_per_tok"]
    for layer in ckpt.moe_layers:
        slots = acts.slots[layer]
        assert sum(s.count for s in slots) == acts.tokens * k
        assert all(s.kept == min(8, s.count) for s in slots)
        # Mixtral's top-k weights are renormalised: each token's weights sum to 1
        assert sum(s.mass for s in slots) == pytest.approx(acts.tokens, rel=1e-5)


def test_calibrated_merge_meets_the_budget_and_stores_what_it_says(family, tmp_path):
    ckpts = open_checkpoints(models(family))
    cal = {"*": str(family / "text.txt")}
    result = merge(
        ckpts,
        tmp_path / "cal",
        # holdout 0: the calibrated planner's own plan is written (the check may choose another)
        MergeSettings(mode="calibrated", budget="0.5", representative="mean", calibration=cal, holdout=0),
    )
    art = Artifact.open(tmp_path / "cal")
    assert verify_artifact(tmp_path / "cal") == []
    assert sum(result.bank_sizes.values()) <= art.manifest["consolidation"]["budget_experts"]
    E = art.experts_per_layer
    found = 0
    for li, layer in enumerate(art.layers):
        for k, entry in enumerate(art.manifest["layers"][li]["bank"]):
            models_in = [m for m, _ in entry["members"]]
            assert len(models_in) == len(set(models_in)) or entry["representative"] is not None
            if "weights" in entry:
                found += 1
                w = entry["weights"]
                for part in art.parts:
                    want = sum(
                        wi * ckpts[m].expert_part(layer, e, part).double() for wi, (m, e) in zip(w, entry["members"])
                    ) / sum(w)
                    torch.testing.assert_close(art.read(bank_key(layer, k, part)).double(), want, rtol=1e-6, atol=1e-7)
        for name in art.model_names:
            assert len(art.slot_map(name, layer)) == E
    assert found > 0


def test_calibrated_needs_calibration_for_every_model(family, tmp_path):
    r = cli(
        "merge",
        *models(family),
        "-o",
        tmp_path / "x",
        "--mode",
        "calibrated",
        "--budget",
        "0.5",
        "--calibration",
        f"a={family / 'text.txt'}",
    )
    assert r.returncode == 2
    one_error_line(r.stderr, "none for 'b'", "calibration b=FILE")


@pytest.mark.parametrize("mode", ["budget", "calibrated"])
def test_merge_at_the_floor_succeeds(family, tmp_path, mode):
    """One model's worth of experts (E per layer, a fraction of 1/N): every slot of every
    model maps to a bank expert, no bank expert holds two different experts of one model."""
    ckpts = open_checkpoints(models(family))
    N, E, L = len(ckpts), ckpts[0].num_experts, len(ckpts[0].moe_layers)
    cal = {"*": str(family / "text.txt")} if mode == "calibrated" else None
    s = MergeSettings(mode=mode, budget=str(1 / N), calibration=cal, calibration_tokens=16)
    result = merge(ckpts, tmp_path / "floor", s)
    assert verify_artifact(tmp_path / "floor") == []
    assert result.bank_sizes == {layer: E for layer in ckpts[0].moe_layers}
    art = Artifact.open(tmp_path / "floor")
    assert art.manifest["consolidation"]["budget_experts"] == L * E
    for li, layer in enumerate(art.layers):
        bank = art.manifest["layers"][li]["bank"]
        for entry in bank:
            members = [tuple(m) for m in entry["members"]]
            by_model: dict[int, list[int]] = {}
            for m, e in members:
                by_model.setdefault(m, []).append(e)
            for m, es in by_model.items():  # two experts of one model only if bit-identical
                assert len(es) == 1 or all(
                    torch.equal(ckpts[m].expert_part(layer, es[0], "w1"), ckpts[m].expert_part(layer, x, "w1"))
                    for x in es
                )
        for m, name in enumerate(art.model_names):
            sm = art.slot_map(name, layer)
            assert len(sm) == E and all(0 <= k < E for k in sm)
            assert all([m, e] in bank[k]["members"] for e, k in enumerate(sm))


# ---------------------------------------------------------------- the quality bar's reading


def load_quality_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_bar_compares_methods_by_mean_gain_and_lists_variant_losses_as_notes():
    from moeconsol.quality.evaluate import SweepPoint, SweepReport

    q = load_quality_benchmark()
    names = ["base", "x", "y"]

    def point(method, budget, fraction, gains, error=None):
        # perplexity-like: base 10, original 5 for x and y; quality from the gain
        quality = {"base": 10.0, **{n: 10.0 - 5.0 * g for n, g in gains.items()}}
        return SweepPoint(method, budget, None, None, fraction, quality, {"base": math.nan, **gains}, {}, error)

    def report(points):
        return SweepReport(
            {n: n for n in names},
            "perplexity",
            True,
            1,
            {"base": 10.0, "x": 5.0, "y": 5.0},
            {n: 10.0 for n in names},
            points,
        )

    lucky = [
        point("reference", 0.5, 0.5, {"x": 1.6, "y": 0.2}),  # x gains from y's experts; mean 0.9
        point("calibrated", 0.5, 0.5, {"x": 0.95, "y": 0.92}),  # mean 0.935
        point("reference", 0.25, 0.25, {"x": 1.0, "y": 0.5}),
        point("calibrated", 0.25, 0.25, {"x": 0.9, "y": 0.7}),
        point("average", None, 0.25, {"x": 0.7, "y": 0.6}),
    ]
    misses, notes = q.check_bar(report(lucky))
    assert misses == []
    assert any(n.startswith("x at 0.5") and "reference 160%" in n for n in notes)
    assert q.matched_budget(report(lucky)) == 0.25
    # a worse mean, a variant under 90% at 0.5, a failed budget and a tie with averaging all miss
    bad = [
        point("reference", 0.5, 0.5, {"x": 1.0, "y": 1.0}),
        point("calibrated", 0.5, 0.5, {"x": 0.95, "y": 0.85}),
        point("calibrated", 0.25, None, {}, error="budget cannot be met"),
        point("calibrated", 0.75, 0.75, {"x": 0.7, "y": 0.6}),
        point("average", None, 0.25, {"x": 0.7, "y": 0.6}),
    ]
    misses, _ = q.check_bar(report(bad))
    assert any("y keeps 85.0%" in m for m in misses)
    assert any("at 0.5: mean retained gain 90.0% < reference 100.0%" in m for m in misses)
    assert any("at 0.25: no artifact" in m for m in misses)
    assert any("at 0.75" in m and "not above uniform averaging 65.0%" in m for m in misses)
    table = "\n".join(q.summary(report(lucky)))
    assert "| reference | 0.5 | 50% | 90% | y 20% |" in table


def test_calibrated_floor_keeps_the_cheaper_of_greedy_and_same_index_clusters(family, tmp_path):
    from moeconsol.analysis.calibration import substitution_costs
    from moeconsol.analysis.similarity import layer_similarity, read_layer
    from moeconsol.consolidate.grouping import cluster_calibrated, identical_groups
    from moeconsol.consolidate.planners.calibrated import calibrated_representatives, same_index_clusters
    from moeconsol.io.digest import tensor_digest as expert_digest

    ckpts = open_checkpoints(models(family))
    N, E = len(ckpts), ckpts[0].num_experts
    text = str(family / "text.txt")
    s = MergeSettings(
        mode="calibrated", budget=str(1 / N), representative="best", calibration={"*": text}, calibration_tokens=16
    )
    merge(ckpts, tmp_path / "floor", s)
    art = Artifact.open(tmp_path / "floor")
    acts = [capture(c, text, max_tokens=16) for c in ckpts]
    groups, costs, digests = [], [], []
    for layer in ckpts[0].moe_layers:
        ex = read_layer(ckpts, layer)
        sim = layer_similarity(ckpts, layer, ["cosine"], None, experts=ex)
        digests.append([expert_digest(e) for e in ex.flat])
        groups.append(identical_groups(layer, digests[-1], E, 1.0 - sim.matrices["cosine"]))
        costs.append(substitution_costs(ckpts[0], layer, ex.flat, acts))
    greedy = cluster_calibrated(groups, [c.cost for c in costs], E * len(groups))
    for li, layer in enumerate(ckpts[0].moe_layers):
        flat = read_layer(ckpts, layer).flat
        aligned = same_index_clusters(groups[li], N)
        assert aligned == [[m * E + e for m in range(N)] for e in range(E)]  # no cross-index twins here
        price = {
            name: calibrated_representatives(ckpts[0], layer, cs, digests[li], costs[li], acts, "best", lambda: flat)[2]
            for name, cs in (("greedy", greedy[li]), ("aligned", aligned))
        }
        stored = [[m * E + e for m, e in entry["members"]] for entry in art.manifest["layers"][li]["bank"]]
        want = greedy[li] if price["greedy"] <= price["aligned"] else aligned
        assert sorted(stored) == sorted(want), (layer, price)
    # twins at different indices (a0 == b1) rule the same-index clusters out
    lg = identical_groups("l", ["x", "p", "q", "x"], 2)
    assert same_index_clusters(lg, 2) is None
