"""Calibrated costs measure a swap's error relative to what the layer passes on.

`calibration.capture` keeps, for each routed token, the squared norm of the MoE layer's
output (residual stream after the block); `substitution_costs` is
(count/kept) * sum_t w_t^2 ||f_j(x_t) - f_i(x_t)||^2 / ||h_t||^2 / T_m. Checked here against
transformers' own modules, computed another way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeconsol.analysis.calibration import (
    ModelActivations,
    SlotActivations,
    calibration_batches,
    capture,
    load_model,
    load_tokenizer,
    substitution_costs,
)
from moeconsol.analysis.similarity import read_layer
from moeconsol.consolidate.grouping import cluster_calibrated, identical_groups
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.testing import SAMPLE_TEXT, derive_variant, save_model, tiny_mixtral, tiny_tokenizer

CHUNK = 48


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("costs")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=11)
    save_model(base, root / "base", tok)
    save_model(derive_variant(base, 4, [(0, 1), (1, 2)], scale=0.2), root / "ft", tok)
    (root / "text.txt").write_text(SAMPLE_TEXT * 2)
    ckpts = open_checkpoints([f"base={root / 'base'}", f"ft={root / 'ft'}"])
    acts = [capture(c, str(root / "text.txt"), max_tokens=10**6, chunk_len=CHUNK, max_chunks=1) for c in ckpts]
    return root, ckpts, acts


def _layer_io(model, ids, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, h) of decoder layer i for every token: the experts' input (post-attention norm's
    output) and the layer's output, computed as h_mid + the MoE block of x from h_mid."""
    block = model.model.layers[i]
    seen = {}
    handle = block.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.update(h_mid=a[0], x=out))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            h = seen["h_mid"] + block.mlp(seen["x"])
    finally:
        handle.remove()
    H = h.shape[-1]
    return seen["x"].reshape(-1, H).float(), h.reshape(-1, H).double()


def test_each_kept_token_carries_the_norm_of_its_layer_output(family):
    _, ckpts, acts = family
    ckpt = ckpts[1]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    root = family[0]
    ids = calibration_batches(str(root / "text.txt"), tok, None, CHUNK, 1)[0]["input_ids"]
    T = ids.numel()
    for i, layer in enumerate(ckpt.moe_layers):
        x_all, h_all = _layer_io(model, ids, i)
        assert acts[1].layer_tokens[layer] == T
        checked = 0
        for slot in acts[1].slots[layer]:
            if slot.kept == 0:
                continue
            x, _ = slot.inputs()
            h2 = torch.cat(slot.h2)
            for row, got in zip(x, h2):
                p = int(torch.argmin((x_all - row).abs().amax(-1)))  # the token this input came from
                assert torch.allclose(x_all[p], row, atol=1e-6)
                assert float(got) == pytest.approx(float((h_all[p] ** 2).sum()), rel=1e-5)
                checked += 1
        assert checked == T * ckpt.config["num_experts_per_tok"]  # every routed token, once per expert


def test_costs_against_transformers_experts(family):
    """cost[i, j] from the definition, with each expert's output from transformers' experts
    module of the model that holds it."""
    _, ckpts, acts = family
    models = [load_model(c) for c in ckpts]
    E = ckpts[0].num_experts
    layer = ckpts[0].moe_layers[1]
    flat = read_layer(ckpts, layer).flat
    lc = substitution_costs(ckpts[0], layer, flat, acts)

    def f(item: int, x: torch.Tensor) -> torch.Tensor:
        experts = models[item // E].model.layers[1].mlp.experts
        index = torch.full((len(x), 1), item % E, dtype=torch.long)
        with torch.no_grad():
            return experts(x, index, torch.ones(len(x), 1)).double()

    for i in (0, 1, E + 1, E + 2):
        m = i // E
        slot = acts[m].slots[layer][i % E]
        if slot.kept == 0:
            continue
        x, w = slot.inputs()
        h2 = torch.cat(slot.h2)
        for j in (1, 2, E + 1, E + 3):
            if j == i:
                continue
            direct = slot.count / slot.kept * float((w.double() ** 2 * ((f(j, x) - f(i, x)) ** 2).sum(-1) / h2).sum())
            direct /= acts[m].layer_tokens[layer]
            assert lc.cost[i, j] == pytest.approx(direct, rel=1e-4, abs=1e-12)
    assert lc.norm.tolist() == [float(a.layer_tokens[layer]) for a in acts]


def test_a_model_whose_expert_errors_reach_the_stream_whole_is_protected(family):
    """Two models whose experts are each other's negatives (f_B = -f_A), with the same routed
    inputs and so the same raw error for every swap between them, and the same expert-output
    energy: the one whose layer output is small beside its expert outputs (its experts
    dominate the stream) pays 25 x more for the same swap, and the greedy serves a slot of
    the other one by another expert."""
    _, ckpts, _ = family
    ckpt = ckpts[0]
    E = ckpt.num_experts
    layer = ckpt.moe_layers[0]
    own = read_layer(ckpts[:1], layer).flat
    negated = [{p: -t if p == "w2" else t for p, t in ex.items()} for ex in own]
    x = torch.randn(6, ckpt.config["hidden_size"], generator=torch.Generator().manual_seed(0))

    def run(h2: float) -> ModelActivations:
        slots = [
            SlotActivations([x.clone()], [torch.full((6,), 0.5)], 12, 3.0, [torch.full((6,), h2, dtype=torch.float64)])
            for _ in range(E)
        ]
        return ModelActivations("m", {layer: slots}, 24, {layer: 24})

    lc = substitution_costs(ckpt, layer, own + negated, [run(100.0), run(4.0)])  # ||h||^2: 100 vs 4

    def f(ex: dict, xs: torch.Tensor) -> torch.Tensor:  # Mixtral's expert, written out
        xs = xs.double()
        return (torch.nn.functional.silu(xs @ ex["w1"].double().T) * (xs @ ex["w3"].double().T)) @ ex["w2"].double().T

    for a, b in ((0, E + 1), (E + 2, 3), (1, 2), (E, E + 3)):
        h2 = 100.0 if a < E else 4.0
        flat = own + negated
        direct = 12 / 6 * 0.25 * float(((f(flat[b], x) - f(flat[a], x)) ** 2).sum()) / h2 / 24
        assert lc.cost[a, b] == pytest.approx(direct, rel=1e-6)
    assert np.allclose(lc.cost[E:, :E], 25.0 * lc.cost[:E, E:].T)  # same raw error, 25 x the price
    lg = identical_groups(layer, [f"d{i}" for i in range(2 * E)], E)
    clusters = cluster_calibrated([lg], [lc.cost], 2 * E - 1)[0]
    ((a, b),) = [c for c in clusters if len(c) > 1]  # one shared bank expert
    assert a < E <= b
    assert lc.cost[a, b] < lc.cost[b, a]  # served by b's expert: the slot of the large-output model moves
