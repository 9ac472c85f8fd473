"""The streamed Gram matrix (from the byte ranges on disk, column slices on a worker pool)
against an independent float64 computation in numpy, on bf16 experts.

Tolerances. The Gram matrix is accumulated in float64 (bf16 -> float64 is exact). For
experts of K values, each G_ij carries at most K * u * sum_k |x_ik x_jk| of rounding error
(u = 2^-53; the BLAS may sum in any order), which by Cauchy-Schwarz is at most
K * u * |x_i| |x_j|: an absolute cosine error of K * u, 6.8e-13 for the K = 6144 values of
these experts (numpy's reference has the same bound). So cosines must agree to 2e-12 (the
two bounds added). l2 is sqrt(G_ii + G_jj - 2 G_ij): the error of l2^2 is at most
4 K u max(|x_i|, |x_j|)^2, so that of l2 at most that / (2 l2) (`_l2_bound`; for the pair
one bf16 ulp apart, 0.36% of its l2, which no Gram matrix can beat: the cancellation is
inherent in computing distances from one). A float32 accumulation (the obvious faster
alternative) fails these tests: with float32 slices the cosines here are off by up to
9.6e-8 and the one-ulp pair's l2 is 8x too large (measured).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeconsol import testing as T
from moeconsol.analysis import similarity as S
from moeconsol.errors import MoeconsolWarning
from moeconsol.io.checkpoint import open_checkpoints

LAYER = 0
EXPERT = 2  # the expert the "ulp" variant moves by one bf16 ulp, in one value


def _experts_file(d):
    return d / "model.safetensors"


def _name(e: int, part: str) -> str:
    return f"model.layers.{LAYER}.block_sparse_moe.experts.{e}.{part}.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """bf16 base; `ulp`: the base with one value of one expert one ulp larger; `ft`: two
    experts perturbed as a fine-tune would (cosine ~0.9999 to the base's)."""
    root = tmp_path_factory.mktemp("gram")
    base = T.tiny_mixtral(seed=0).to(torch.bfloat16)
    dirs = {"base": T.save_model(base, root / "base")}
    dirs["ft"] = T.save_model(
        T.derive_variant(base, 1, [(0, 1), (0, 3)], change_non_experts=False, scale=0.0002), root / "ft"
    )
    dirs["ulp"] = T.save_model(base, root / "ulp")
    tensors = load_file(_experts_file(dirs["ulp"]))
    bits = tensors[_name(EXPERT, "w2")].view(torch.int16)
    bits.view(-1)[17] += 1  # the next bf16 value away from zero (or towards it, for a negative value)
    save_file(tensors, _experts_file(dirs["ulp"]), metadata={"format": "pt"})
    return dirs


def _bf16_to_float64(t: torch.Tensor) -> np.ndarray:
    """bf16 -> float64 from the bits, in numpy: bf16 is the high half of a float32."""
    bits = t.contiguous().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64)


def _reference(dirs) -> list[np.ndarray]:
    """Every expert of layer LAYER as one float64 vector (parts in Layout.parts order: w1, w2, w3)."""
    vecs = []
    for d in dirs:
        t = load_file(_experts_file(d))
        for e in range(4):
            vecs.append(np.concatenate([_bf16_to_float64(t[_name(e, p)]).ravel() for p in ("w1", "w2", "w3")]))
    return vecs


def _l2_bound(a: np.ndarray, b: np.ndarray, dist: float) -> float:
    """Rounding bound of an l2 distance computed from a float64 Gram matrix (module docstring)."""
    return 4 * len(a) * 2.0**-53 * max(a @ a, b @ b) / (2 * dist)


def test_weight_metrics_match_float64_reference(family):
    dirs = [family["base"], family["ft"], family["ulp"]]
    ckpts = open_checkpoints([str(d) for d in dirs])
    sim = S.layer_similarity(ckpts, ckpts[0].moe_layers[LAYER], ["cosine", "l2", "relative-l2"])
    vecs = _reference(dirs)
    assert len(vecs[0]) == 6144
    for i, a in enumerate(vecs):
        for j, b in enumerate(vecs):
            na, nb = np.sqrt(a @ a), np.sqrt(b @ b)
            if np.array_equal(a, b):
                assert sim.identical[i, j] and sim.matrices["cosine"][i, j] == 1.0 and sim.matrices["l2"][i, j] == 0.0
                continue
            assert not sim.identical[i, j]
            cos, dist = (a @ b) / (na * nb), np.sqrt(np.sum((a - b) ** 2))
            assert sim.matrices["cosine"][i, j] < 1.0
            assert abs(sim.matrices["cosine"][i, j] - cos) <= 2e-12
            assert abs(sim.matrices["l2"][i, j] - dist) <= _l2_bound(a, b, dist)
            assert abs(sim.matrices["relative-l2"][i, j] - dist / max(na, nb)) <= _l2_bound(a, b, dist) / max(na, nb)


def test_one_ulp_apart_is_below_one_and_matches_float64(family):
    """Two experts differing in one bf16 ulp of one value: cosine < 1, equal to numpy's
    float64 cosine to the tolerance above, and l2 equal to that one ulp."""
    dirs = [family["base"], family["ulp"]]
    ckpts = open_checkpoints([str(d) for d in dirs])
    sim = S.layer_similarity(ckpts, ckpts[0].moe_layers[LAYER], ["cosine", "l2"])
    a, b = _reference(dirs)[EXPERT], _reference(dirs)[4 + EXPERT]
    ulp = np.abs(a - b).max()
    assert np.count_nonzero(a != b) == 1 and ulp > 0
    ref_cos = (a @ b) / np.sqrt((a @ a) * (b @ b))
    assert 1 - ref_cos > 1e-11  # the effect is resolvable in float64: a fair test
    i, j = EXPERT, 4 + EXPERT
    assert sim.matrices["cosine"][i, j] < 1.0
    assert abs(sim.matrices["cosine"][i, j] - ref_cos) <= 2e-12
    assert abs(sim.matrices["l2"][i, j] - ulp) <= _l2_bound(a, b, ulp) <= 0.004 * ulp
    others = [e for e in range(4) if e != EXPERT]
    assert all(sim.matrices["cosine"][e, 4 + e] == 1.0 for e in others)


def test_disk_and_memory_paths_agree_bit_for_bit(family, monkeypatch):
    """The same slices summed in the same order: the streamed result equals the in-memory
    one exactly, also with slices of a few columns (last one partial) and one worker."""
    ckpts = open_checkpoints([str(family["base"]), str(family["ft"])])
    layer = ckpts[0].moe_layers[LAYER]
    memory = S.layer_similarity(ckpts, layer, ["cosine", "l2"], experts=S.read_layer(ckpts, layer))
    disk = S.layer_similarity(ckpts, layer, ["cosine", "l2"])
    for m in ("cosine", "l2"):
        assert np.array_equal(memory.matrices[m], disk.matrices[m])
    monkeypatch.setattr(S, "_CHUNK_ELEMENTS", 7 * 6)  # 7 columns of 6 distinct experts, 2048 % 7 != 0
    monkeypatch.setattr(S, "WORKERS", 1)
    small = S.layer_similarity(ckpts, layer, ["cosine", "l2"])
    assert np.allclose(small.matrices["cosine"], disk.matrices["cosine"], rtol=0, atol=1e-13)


def test_thread_settings_are_left_alone(family):
    """Workers run torch on one thread each; the caller's count, and that of a thread
    starting afterwards, are unchanged."""
    before = torch.get_num_threads()
    ckpts = open_checkpoints([str(family["base"]), str(family["ft"])])
    S.layer_similarity(ckpts, ckpts[0].moe_layers[LAYER], ["cosine"])
    with S._workers() as pool:
        inside = set(pool.map(lambda _: torch.get_num_threads(), range(8)))
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert inside == {1} and torch.get_num_threads() == before and seen == [before]


@pytest.mark.parametrize(
    "value, what", [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (0.0, "all zero")]
)
def test_unusual_parts_warn_once_per_position(family, tmp_path, value, what):
    """A poisoned part shared bit for bit by two models warns for each of them, once, from
    the Gram diagonal; the healthy parts do not warn."""
    poisoned = []
    for k in ("a", "b"):
        d = T.save_model(T.tiny_mixtral(seed=0).to(torch.bfloat16), tmp_path / k)
        tensors = load_file(_experts_file(d))
        name = _name(1, "w3")
        tensors[name] = (
            torch.full_like(tensors[name], value)
            if value == 0
            else tensors[name].clone().index_fill_(0, torch.tensor([0]), value)
        )
        save_file(tensors, _experts_file(d), metadata={"format": "pt"})
        poisoned.append(d)
    ckpts = open_checkpoints([str(family["base"]), *map(str, poisoned)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S.layer_similarity(ckpts, ckpts[0].moe_layers[LAYER], ["cosine"])
    messages = [str(w.message) for w in caught if issubclass(w.category, MoeconsolWarning)]
    assert len(messages) == 2, messages
    assert all(what in m and "expert 1 part w3" in m for m in messages)
    assert {m.split("'")[1] for m in messages} == {"a", "b"}


def test_identity_keys_are_equal_exactly_for_identical_experts(tmp_path):
    """Fingerprints (ends of each part) only spare the full digest of experts no other can
    equal: experts differing only in the middle of a part share a fingerprint and are told
    apart by their full digests; identical ones get the same full digest."""
    from moeconsol.io.digest import range_digest
    from moeconsol.io.safetensors_file import read_header

    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3, 64, 256, generator=g) * 0.02).to(
        torch.bfloat16
    )  # 32 KiB per part: the windows miss the middle
    middle = base.clone()
    middle[1, 32, 7] += 0.5  # differs from base only in the middle of expert 1's part
    tail = base.clone()
    tail[2, -1, -1] += 0.5  # differs in the last bytes of expert 2's part
    save_file(
        {f"m{k}.e{e}.w": t[e].contiguous() for k, t in enumerate((base, middle, tail)) for e in range(3)},
        tmp_path / "x.safetensors",
    )
    tensors, _ = read_header(tmp_path / "x.safetensors")
    infos = [{"w": tensors[f"m{k}.e{e}.w"]} for k in range(3) for e in range(3)]
    with S._workers() as pool:
        keys = S._identity_keys(infos, pool)
    raw = [bytes(t[e].contiguous().view(torch.uint8).numpy()) for t in (base, middle, tail) for e in range(3)]
    for i in range(9):
        for j in range(9):
            assert (keys[i] == keys[j]) == (raw[i] == raw[j]), (i, j)
    full = [i for i, k in enumerate(keys) if not k.startswith("fingerprint:")]
    assert 4 in full and 1 in full  # base's and middle's expert 1: same ends, so hashed in full
    assert all(keys[i] == range_digest(infos[i]) for i in full)
    assert 8 not in full  # tail's expert 2 differs at its end: no other can equal it
