"""Metrics against independent numpy computations; CKA's invariances; report summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from moeconsol import testing as T
from moeconsol.analysis import report as R
from moeconsol.analysis import similarity as S
from moeconsol.errors import MoeconsolError
from moeconsol.io.checkpoint import open_checkpoints


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base (per-expert file), v1 (fused, sharded), v2 (per-expert): known changed experts."""
    root = tmp_path_factory.mktemp("sim")
    base = T.tiny_mixtral(seed=0)
    v1 = T.derive_variant(base, 1, [(0, 1)], scale=0.005)
    v2 = T.derive_variant(base, 2, [(0, 1), (0, 2)], scale=0.005)
    return [
        T.save_model(base, root / "base"),
        T.save_model(v1, root / "v1", fused=True, max_shard_size="20KB"),
        T.save_model(v2, root / "v2"),
    ]


@pytest.fixture(scope="module")
def ckpts(family):
    return open_checkpoints([str(p) for p in family])


def _numpy_experts(dirs, layer: int, num_experts: int = 4) -> list[dict[str, np.ndarray]]:
    """Experts read with safetensors' numpy loader, per-expert or fused, in float64."""
    out = []
    for d in dirs:
        tensors = {}
        for f in sorted(d.glob("*.safetensors")):
            tensors.update(load_file(f))
        for e in range(num_experts):
            per = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            if f"{per}.w1.weight" in tensors:
                parts = {p: tensors[f"{per}.{p}.weight"] for p in ("w1", "w2", "w3")}
            else:
                gu = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
                half = gu.shape[0] // 2
                parts = {
                    "w1": gu[:half],
                    "w3": gu[half:],
                    "w2": tensors[f"model.layers.{layer}.mlp.experts.down_proj"][e],
                }
            out.append({k: v.astype(np.float64) for k, v in parts.items()})
    return out


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _cka_feature_space(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA in feature space: |A^T B|_F^2 / (|A^T A|_F |B^T B|_F), columns centred."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    return float(np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


@pytest.mark.parametrize("layer_index", [0, 1])
def test_weight_metrics_match_numpy(ckpts, family, layer_index):
    layer = ckpts[0].moe_layers[layer_index]
    sim = S.layer_similarity(ckpts, layer, ["cosine", "l2", "relative-l2"])
    experts = _numpy_experts(family, layer_index)
    vecs = [np.concatenate([e["w1"].ravel(), e["w2"].ravel(), e["w3"].ravel()]) for e in experts]
    n = len(vecs)
    assert sim.matrices["cosine"].shape == (n, n) == (12, 12)
    for i in range(n):
        for j in range(n):
            a, b = vecs[i], vecs[j]
            same = np.array_equal(a, b)
            na, nb = np.sqrt(np.sum(a * a)), np.sqrt(np.sum(b * b))
            cos = np.sum(a * b) / (na * nb)
            dist = np.sqrt(np.sum((a - b) ** 2))
            if same:
                assert sim.matrices["cosine"][i, j] == 1.0
                assert sim.matrices["l2"][i, j] == 0.0 and sim.matrices["relative-l2"][i, j] == 0.0
            else:
                assert sim.matrices["cosine"][i, j] < 1.0
                assert sim.matrices["cosine"][i, j] == pytest.approx(cos, rel=1e-9, abs=1e-12)
                assert sim.matrices["l2"][i, j] == pytest.approx(dist, rel=1e-6)
                assert sim.matrices["relative-l2"][i, j] == pytest.approx(dist / max(na, nb), rel=1e-6)
            assert sim.identical[i, j] == same


def test_identical_positions_follow_the_variants(ckpts):
    sim0 = S.layer_similarity(ckpts, "model.layers.0", ["cosine"])
    E = 4
    # v1 changed (0, 1); v2 changed (0, 1) and (0, 2); everything else is the base's bytes.
    expected_same = {(m, e) for m in (1, 2) for e in range(E)} - {(1, 1), (2, 1), (2, 2)}
    for m in (1, 2):
        for e in range(E):
            assert sim0.identical[e, m * E + e] == ((m, e) in expected_same)
            assert (sim0.matrices["cosine"][e, m * E + e] == 1.0) == ((m, e) in expected_same)
    sim1 = S.layer_similarity(ckpts, "model.layers.1", ["cosine"])
    assert all(sim1.matrices["cosine"][e, m * E + e] == 1.0 for m in (1, 2) for e in range(E))


def test_cka_matches_numpy(ckpts, family):
    probes = S.gaussian_probes(32, 64, seed=5)
    sim = S.layer_similarity(ckpts, "model.layers.0", ["cka"], probes)
    x = probes.numpy()
    outs = [(_silu(x @ e["w1"].T) * (x @ e["w3"].T)) @ e["w2"].T for e in _numpy_experts(family, 0)]
    for i in range(len(outs)):
        for j in range(len(outs)):
            if sim.identical[i, j]:
                assert sim.matrices["cka"][i, j] == 1.0
            else:
                assert sim.matrices["cka"][i, j] == pytest.approx(_cka_feature_space(outs[i], outs[j]), rel=1e-9)


def _synthetic_expert(g: torch.Generator, h: int = 16, i: int = 24) -> dict[str, torch.Tensor]:
    return {
        "w1": torch.randn(i, h, generator=g, dtype=torch.float64),
        "w3": torch.randn(i, h, generator=g, dtype=torch.float64),
        "w2": torch.randn(h, i, generator=g, dtype=torch.float64),
    }


def _gated(p, x):
    return (torch.nn.functional.silu(x @ p["w1"].T) * (x @ p["w3"].T)) @ p["w2"].T


def test_cka_invariances():
    g = torch.Generator().manual_seed(0)
    a = _synthetic_expert(g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    rotated = {**a, "w2": q @ a["w2"]}  # outputs y -> y Q^T
    scaled = {**a, "w2": 3.5 * a["w2"]}  # outputs y -> 3.5 y
    stretched = {**a, "w2": torch.diag(torch.linspace(0.1, 5.0, 16, dtype=torch.float64)) @ a["w2"]}
    other = _synthetic_expert(g)
    probes = S.gaussian_probes(16, 128, seed=1)
    m = S.cka_matrix([a, rotated, scaled, stretched, other], probes, _gated)
    assert m[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert m[0, 2] == pytest.approx(1.0, abs=1e-12)
    assert m[0, 3] < 0.99  # not invariant to anisotropic scaling
    assert m[0, 4] < 0.9
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0)


def test_gram_chunking_is_exact(monkeypatch):
    g = torch.Generator().manual_seed(2)
    experts = [{"w1": torch.randn(7, 5, generator=g), "w2": torch.randn(5, 7, generator=g)} for _ in range(3)]
    whole = S.gram_matrix(experts, ("w1", "w2"))
    monkeypatch.setattr(S, "_CHUNK_ELEMENTS", 8)  # chunks of 2 elements, last one partial
    chunked = S.gram_matrix(experts, ("w1", "w2"))
    vecs = np.stack(
        [np.concatenate([e["w1"].numpy().ravel(), e["w2"].numpy().ravel()]).astype(np.float64) for e in experts]
    )
    assert np.allclose(whole, vecs @ vecs.T, rtol=1e-12)
    assert np.allclose(chunked, vecs @ vecs.T, rtol=1e-12)


def test_gaussian_probes_are_seeded(ckpts):
    a = list(S.analyze(ckpts, ["cka"], n_probes=16, seed=3))
    b = list(S.analyze(ckpts, ["cka"], n_probes=16, seed=3))
    c = list(S.analyze(ckpts, ["cka"], n_probes=16, seed=4))
    assert np.array_equal(a[0].matrices["cka"], b[0].matrices["cka"])
    assert not np.array_equal(a[0].matrices["cka"], c[0].matrices["cka"])


def test_unknown_metric():
    with pytest.raises(MoeconsolError, match="unknown `metric` 'cos': choose from cosine, l2, relative-l2, cka"):
        S.check_metrics(["cos"])


def test_report_summary_counts(ckpts):
    report = R.analyze_models(ckpts, ["cosine", "relative-l2"])
    assert report.models == ["base", "v1", "v2"] and report.layouts == ["mixtral", "mixtral-fused", "mixtral"]
    assert report.probes is None
    s0 = R.same_index_summary(report, report.layers[0])
    s1 = R.same_index_summary(report, report.layers[1])
    assert s0["pairs"] == s1["pairs"] == 3 * 4
    shared0 = {s["rule"]: s["experts"] for s in s0["shared"]}
    # layer 0, per index: e0 all same (2 saved), e1 all differ (0), e2 base == v1 (1), e3 (2).
    assert shared0["identical"] == 5
    assert s0["identical_pairs"] == 3 + 0 + 1 + 3
    assert {s["rule"]: s["experts"] for s in s1["shared"]}["identical"] == 8
    # Independent mean/min/max over same-index pairs.
    m = report.layers[0].matrices["cosine"]
    values = [m[a * 4 + e, b * 4 + e] for e in range(4) for a in range(3) for b in range(a + 1, 3)]
    assert s0["metrics"]["cosine"] == {"mean": pytest.approx(np.mean(values)), "min": min(values), "max": max(values)}
    # Sharing at thresholds, counted independently with scipy's connected components.
    from scipy.sparse.csgraph import connected_components

    for metric, t, alike in (("cosine", 0.9, lambda v: v >= 0.9), ("relative-l2", 0.1, lambda v: v <= 0.1)):
        mat = report.layers[0].matrices[metric]
        saved = 0
        for e in range(4):
            idx = [k * 4 + e for k in range(3)]
            saved += 3 - connected_components(alike(mat[np.ix_(idx, idx)]), directed=False)[0]
        assert shared0[R.threshold_label(metric, t)] == saved
    assert shared0["cosine >= 0.9"] >= shared0["cosine >= 0.99"] >= shared0["identical"]


def test_shared_count_groups_transitively():
    # 3 models, 1 expert index: 0~1 and 1~2 alike -> one group -> 2 saved.
    alike = np.eye(3, dtype=bool)
    alike[0, 1] = alike[1, 2] = True
    assert R._shared_count(alike, 3, 1) == 2
    alike[1, 2] = False
    assert R._shared_count(alike, 3, 1) == 1


def test_calibration_probes(ckpts, tmp_path):
    tok = T.tiny_tokenizer()
    tok.save_pretrained(ckpts[0].path)
    text = tmp_path / "calib.txt"
    text.write_text(T.SAMPLE_TEXT)
    report = R.analyze_models(ckpts, ["cka"], calibration=text, n_probes=40)
    assert report.probes.kind == "calibration" and report.probes.count == 40 and report.probes.seed is None
    probes = S.probe_inputs_from_text(ckpts[0], T.SAMPLE_TEXT, 40)
    assert probes["model.layers.0"].shape == (40, 32)
    # The layer's CKA is the numpy CKA of the experts' outputs on exactly these probes.
    x = probes["model.layers.1"].numpy()
    e0 = ckpts[0].expert("model.layers.1", 0)
    e1 = ckpts[0].expert("model.layers.1", 1)
    outs = [
        (_silu(x @ e["w1"].double().numpy().T) * (x @ e["w3"].double().numpy().T)) @ e["w2"].double().numpy().T
        for e in (e0, e1)
    ]
    assert report.layers[1].matrices["cka"][0, 1] == pytest.approx(_cka_feature_space(*outs), rel=1e-9)
    with pytest.raises(MoeconsolError, match="calibration file not found"):
        R.analyze_models(ckpts, ["cka"], calibration=tmp_path / "absent.txt")
    with pytest.raises(MoeconsolError, match="`probes` must be at least 2"):
        R.analyze_models(ckpts, ["cka"], n_probes=1)
