"""Cross-variant batching: one forward, and one decode step, for rows of any variant.

References are the same artifact served in swap mode, one variant activated at a time and
one prompt at a time (itself tested against transformers' models from the original
checkpoints in test_runtime.py), so a mixed batch is checked against an independent path:
other module classes, no per-row tensors, no per-token slot-map lookup. Every family is
in the table: the decoder-only ones, and Switch Transformers (an encoder-decoder: encoder
outputs and cross-attention cache per row, a relative attention bias per variant, the
router's one-hot choice folded per token).
"""

from __future__ import annotations

import copy

import pytest
import torch
from builders import correction_family as build_delta_family
from builders import merge_with_corrections as merge_with_deltas

from moeconsol.consolidate import MergeSettings, merge
from moeconsol.errors import MoeconsolError, SettingsError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.crossvariant import ServingMode
from moeconsol.serving.engine import Engine, FinishReason, GenerationSettings, Request, complete
from moeconsol.serving.runtime import Runtime
from moeconsol.serving.variants import Family
from moeconsol.testing import derive_variant, save_model, tiny_model, tiny_switch, tiny_tokenizer

CROSS = ServingMode.CROSS_VARIANT
PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a model",
    "def add(a, b):",
    "0123",
    "Experts are small feed-forward networks",
    "a router picks two",
]
# Float32 rows computed in a batch of another size than alone may round differently in the
# last bits (a matmul of another shape may block its sums another way): the bound the runtime
# tests use against transformers' own models, far below the variants' own differences (>1e-3).
TOL = dict(rtol=1e-5, atol=1e-5)


# Switch: "same" changes every expert of both MoE layers (one-hot routing picks one expert a
# token: with fewer changed, its logits may equal base's, and the per-token fold goes untested)
SAME_EXPERTS = {"mixtral": [(1, 0), (0, 3)], "switch_transformers": [(m, e) for m in (0, 1) for e in range(4)]}


def _variants(root, arch: str = "mixtral"):
    """base; ft (experts and every non-expert tensor changed); same (experts only: its
    non-expert tensors are the base's, so it shares base's tensor set)."""
    tok = tiny_tokenizer()
    base = tiny_model(arch, 0)
    models = {
        "base": base,
        "ft": derive_variant(base, 1, changed_experts=[(0, 1), (1, 2)], scale=0.5),
        "same": derive_variant(base, 2, changed_experts=SAME_EXPERTS[arch], change_non_experts=False, scale=0.5),
    }
    return [f"{n}={save_model(m, root / n, tok)}" for n, m in models.items()]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """name -> artifact: lossless, budget-merged (approximate sharing: the slot maps differ
    more), and calibrated with expert deltas (private bank entries per variant), of Mixtral;
    lossless and calibrated with deltas of Switch Transformers."""
    root = tmp_path_factory.mktemp("xvariant")
    models = _variants(root)
    merge(open_checkpoints(models), root / "lossless")
    merge(open_checkpoints(models), root / "budget", MergeSettings(mode="budget", budget="0.375"))
    merge(open_checkpoints(_variants(root / "sw", "switch_transformers")), root / "switch")
    out = {"lossless": root / "lossless", "budget": root / "budget", "switch": root / "switch"}
    for kind, arch in (("deltas", "mixtral"), ("switch-deltas", "switch_transformers")):
        fam = build_delta_family(tmp_path_factory.mktemp(f"xvariant-{kind}"), arch)
        merge_with_deltas(fam, fam["root"] / "out")
        out[kind] = fam["root"] / "out"
    return out


@pytest.fixture(scope="module")
def runtimes(artifacts):
    """name -> (swap-mode runtime, cross-variant runtime) of the same artifact."""
    return {k: (Runtime.from_artifact(p), Runtime.from_artifact(p, mode=CROSS)) for k, p in artifacts.items()}


def _ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def _logits(rt: Runtime, ids: torch.Tensor) -> torch.Tensor:
    """One forward of the runtime's model on `ids` (an encoder-decoder: the prompt through the
    encoder, a few decoder tokens from the start token through the decoder)."""
    config = rt.model.config
    if not config.is_encoder_decoder:
        return rt.model(input_ids=ids).logits
    decoder = torch.tensor([[config.decoder_start_token_id, 5, 7, 9]]).expand(len(ids), -1)
    return rt.model(input_ids=ids, decoder_input_ids=decoder).logits


ALL_KINDS = ["lossless", "budget", "deltas", "switch", "switch-deltas"]


def _mixed_and_alone(swap: Runtime, cross: Runtime, tol: dict) -> dict[str, torch.Tensor]:
    """One mixed forward of every variant, interleaved, on `cross`; each row equals the same
    prompt run alone on `swap` with its variant activated. Returns the rows alone by name."""
    names = swap.names
    order = [names[i % len(names)] for i in (1, 0, 2, 1, 2, 0)]  # every variant, interleaved
    ids = torch.tensor(
        [_ids(swap.tokenizer(names[0]), ["The quick brown fox jumps"])[0]] * len(order), device=swap.device
    )
    with cross.variant_rows(order):
        mixed = _logits(cross, ids)
    alone = {}
    for i, name in enumerate(order):
        swap.activate(name)
        alone[name] = _logits(swap, ids[i : i + 1])[0]
        torch.testing.assert_close(mixed[i], alone[name], **tol)
    # not vacuous: the variants' logits differ
    assert not torch.allclose(alone[names[0]], alone[names[1]], atol=1e-3)
    return alone


@pytest.mark.parametrize("kind", ALL_KINDS)
@torch.no_grad()
def test_one_mixed_forward_equals_each_row_alone(runtimes, kind):
    swap, cross = runtimes[kind]
    names = swap.names
    alone = _mixed_and_alone(swap, cross, TOL)
    # and so do the slot maps the bank looks up
    served = {n: tuple(swap._slot_maps[n].flatten().tolist()) for n in names}  # delta slots at private entries
    assert len(set(served.values())) > 1
    if "deltas" in kind:
        assert any(v.deltas for v in swap.family.variants.values())
    if kind == "switch":  # two variants of one tensor set, told apart only by the bank's per-token fold
        assert cross.variant_group("same") == cross.variant_group("base")
        assert not torch.allclose(alone["same"], alone["base"], atol=1e-3)


DEVICES = ["cpu", *([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["budget", "switch"])
@torch.no_grad()
def test_on_device_a_mixed_forward_equals_each_row_alone(artifacts, kind, device):
    """The same check on each available device (benchmarks/device.sh runs it on CUDA). CUDA's
    float32 kernels sum in another order for another batch size: 1e-4 there."""
    path = artifacts[kind]
    swap, cross = Runtime.from_artifact(path, device=device), Runtime.from_artifact(path, device=device, mode=CROSS)
    assert next(cross.model.parameters()).device.type == device
    _mixed_and_alone(swap, cross, TOL if device == "cpu" else dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_variants_differing_tensors_are_resident_once(runtimes, kind):
    swap, cross = runtimes[kind]
    s, c = swap.resident_bytes(), cross.resident_bytes()
    distinct = len({tuple(id(t) for t in swap._host[n].values()) for n in swap.names})
    swap_region = sum(t.numel() * t.element_size() for t in next(iter(swap._host.values())).values())
    assert c.non_expert == s.non_expert + (distinct - 1) * swap_region  # + (N - 1) x the swap region
    assert c.host == 0  # nothing waits in host memory
    private = sum(len(v.deltas.get(layer, [])) for v in swap.family.variants.values() for layer in swap.family.layers)
    expert = s.bank // (sum(swap.family.bank_sizes.values()) + sum(swap._private.values()))
    assert c.bank - s.bank == (private - sum(swap._private.values())) * expert  # each variant's own corrected entries
    assert distinct >= 2


@pytest.mark.parametrize("kind", ["lossless", "switch"])
@torch.no_grad()
def test_activate_is_free_and_sets_the_default_rows(runtimes, kind):
    swap, cross = runtimes[kind]
    tok = swap.tokenizer("base")
    ids = torch.tensor(_ids(tok, [PROMPTS[0]]))
    for name in ("ft", "base", "same", "ft"):
        report = cross.activate(name)
        assert report.bytes_moved == 0 and cross.active == name
        swap.activate(name)
        torch.testing.assert_close(_logits(cross, ids), _logits(swap, ids), **TOL)
        assert cross.slot_map(cross.family.layers[0]) == swap.slot_map(swap.family.layers[0])
    # between forwards the modules hold the resident set's own tensors (state_dict names unchanged)
    assert set(cross.model.state_dict()) == set(swap.model.state_dict())


def _alone(rt: Runtime, name: str, ids: list[int], settings: GenerationSettings) -> list[int]:
    return complete(rt, name, list(ids), settings).token_ids


def _run(engine: Engine, requests: list[Request], join_every: int = 1) -> int:
    """Admit one request every `join_every` steps, step to the end; the most rows of one step."""
    waiting, steps = list(requests), 0
    while waiting or engine.running():
        if waiting and steps % join_every == 0:
            engine.admit(waiting.pop(0))
        engine.step()
        steps += 1
    return engine.peak_batch_size


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_greedy_answers_of_a_mixed_batch_equal_each_prompt_alone(runtimes, kind):
    swap, cross = runtimes[kind]
    names = swap.names
    tok = swap.tokenizer(names[0])
    requests = [
        Request(names[i % len(names)], ids, GenerationSettings(max_new_tokens=5 + 2 * i))
        for i, ids in enumerate(_ids(tok, PROMPTS))
    ]
    cross.activate(names[0])
    engine = Engine(cross, max_batch_size=8)
    peak = _run(engine, requests, join_every=2)  # requests of every variant join and leave one running batch
    assert peak >= 3 and not engine.batches
    for r in requests:
        assert r.token_ids == _alone(swap, r.model, r.prompt_ids, r.settings), (r.model, r.prompt_ids)
        assert r.finish in (FinishReason.STOP, FinishReason.LENGTH)
    assert cross.active == names[0] and len(cross.swaps) == 0  # nothing was swapped


@pytest.mark.parametrize("kind", ["budget", "switch"])
def test_prefill_of_mixed_variants_in_one_forward(runtimes, kind):
    swap, cross = runtimes[kind]
    tok = swap.tokenizer("base")
    names = ["ft", "base", "same", "ft", "same"]
    requests = [Request(n, ids, GenerationSettings(max_new_tokens=7)) for n, ids in zip(names, _ids(tok, PROMPTS))]
    engine = Engine(cross)
    assert engine.admit_all(requests) == []  # prompts of every variant and length, one left-padded prefill
    assert engine.running() == 5 and engine.running("ft") == 2 and engine.running("base") == 1
    while engine.running():
        engine.step()
    for r in requests:
        assert r.token_ids == _alone(swap, r.model, r.prompt_ids, r.settings)


@pytest.mark.parametrize("kind", ["lossless", "switch"])
def test_seeded_sampling_gives_the_same_text_mixed_or_alone(runtimes, kind):
    swap, cross = runtimes[kind]
    tok = swap.tokenizer("base")
    cases = [
        ("ft", 1.0, 1.0, 1),
        ("base", 1.5, 0.9, 2),
        ("ft", 0.7, 0.5, 3),
        ("same", 1.2, 1.0, 2**63 - 1),
        ("base", 0.0, 1.0, None),
    ]
    requests = [
        Request(n, ids, GenerationSettings(max_new_tokens=10, temperature=t, top_p=p, seed=s))
        for (n, t, p, s), ids in zip(cases, _ids(tok, PROMPTS))
    ]
    _run(Engine(cross), requests)
    alone = [_alone(swap, r.model, r.prompt_ids, r.settings) for r in requests]
    assert [r.token_ids for r in requests] == alone
    assert len({tuple(t) for t in alone}) > 1


def test_sampling_defaults_and_eos_are_the_requests_own_variants(runtimes):
    """A request that leaves the repetition penalty unset gets its own variant's, not the
    active variant's."""
    swap, cross = runtimes["lossless"]
    tok = swap.tokenizer("base")
    ids = _ids(tok, PROMPTS[:2])
    for rt in (swap, cross):
        rt.family.variants["ft"].generation_config.repetition_penalty = 1.8
    try:
        cross.activate("base")
        defaulted = Request("ft", ids[0], GenerationSettings(max_new_tokens=10))
        plain = Request("base", ids[1], GenerationSettings(max_new_tokens=10))
        _run(Engine(cross), [defaulted, plain])
        want = _alone(swap, "ft", ids[0], GenerationSettings(max_new_tokens=10))
        assert defaulted.token_ids == want
        assert want != _alone(swap, "ft", ids[0], GenerationSettings(max_new_tokens=10, repetition_penalty=1.0))
        assert plain.token_ids == _alone(swap, "base", ids[1], GenerationSettings(max_new_tokens=10))
    finally:
        for rt in (swap, cross):
            rt.family.variants["ft"].generation_config.repetition_penalty = None


@pytest.mark.parametrize("kind", ["lossless", "switch"])
def test_cancel_frees_the_row_within_one_step(runtimes, kind):
    swap, cross = runtimes[kind]
    tok = swap.tokenizer("base")
    ids = _ids(tok, PROMPTS[:1])[0]
    engine = Engine(cross, max_batch_size=2)
    keep = Request("ft", ids, GenerationSettings(max_new_tokens=8))
    gone = Request("base", ids, GenerationSettings(max_new_tokens=200))
    engine.admit_all([keep, gone])
    engine.step()
    assert engine.free_slots() == 0
    gone.cancel()
    produced = len(gone.token_ids)
    assert gone in engine.step() and gone.finish is FinishReason.CANCELLED
    assert len(gone.token_ids) == produced and engine.running() == 1 and engine.free_slots() == 1
    while engine.running():
        engine.step()
    assert keep.token_ids == _alone(swap, "ft", ids, keep.settings)


def test_swap_mode_refuses_a_mixed_forward_and_bad_models_are_refused(runtimes):
    swap, cross = runtimes["lossless"]
    swap.activate("base")
    with pytest.raises(MoeconsolError, match="needs cross-variant batching"):
        with swap.variant_rows(["base", "ft"]):
            pass
    with pytest.raises(MoeconsolError, match="unknown model 'nope'"):
        Engine(cross).admit(Request("nope", [5], GenerationSettings()))


def test_every_switch_module_owning_a_differing_tensor_runs_per_variant(runtimes):
    """In the Switch artifact every non-expert tensor differs between base and ft: the shared
    embedding (tied to both stacks' embed_tokens and the LM head), the relative attention
    biases, every norm, attention and cross-attention projection, dense layer and router.
    Each one's module runs per variant group (the bias through its attention's compute_bias)."""
    swap, cross = runtimes["switch"]
    a, b = swap.family.variants["base"].tensors, swap.family.variants["ft"].tensors
    differing = {n for n in a if a[n] != b[n]}
    kinds = {n.split(".")[-2] for n in differing}
    assert {
        "shared",
        "relative_attention_bias",
        "layer_norm",
        "final_layer_norm",
        "q",
        "k",
        "v",
        "o",
        "wi",
        "wo",
        "classifier",
    } <= kinds
    for name in differing:
        module = name.rpartition(".")[0]
        holder = module.rpartition(".")[0] if module.endswith("relative_attention_bias") else module
        assert type(cross.model.get_submodule(holder)).__name__.startswith("PerVariant"), name
    head = cross.model.get_submodule("lm_head")
    assert head.weight is cross.model.get_submodule("shared").weight and type(head).__name__ == "PerVariantLinear"


@torch.no_grad()
def test_switch_relative_attention_bias_is_each_variants_own():
    """Variants that differ only in the relative attention bias (an Embedding fed position
    buckets, not rows): each row gets its own variant's bias, in the encoder and the decoder."""
    tok = tiny_tokenizer()
    base = tiny_switch(0)
    other = copy.deepcopy(base)
    for name, p in other.named_parameters():
        if "relative_attention_bias" in name:
            p.data += torch.randn(p.shape, generator=torch.Generator().manual_seed(3))
    family = Family.from_models({"a": base, "b": other}, {"a": tok, "b": tok})
    assert {
        n for n in family.variants["a"].tensors if family.variants["a"].tensors[n] != family.variants["b"].tensors[n]
    } == {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    }
    swap, cross = Runtime(family), Runtime(family, mode=CROSS)
    ids = torch.tensor(_ids(tok, ["The quick brown fox jumps"]) * 3)
    order = ["b", "a", "b"]
    with cross.variant_rows(order):
        mixed = _logits(cross, ids)
    for i, name in enumerate(order):
        swap.activate(name)
        torch.testing.assert_close(mixed[i], _logits(swap, ids[i : i + 1])[0], **TOL)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_a_module_that_is_not_row_wise_is_refused():
    """gpt-oss' attention owns `sinks` itself and takes the cache and mask too: its rows
    cannot be split by variant, so an artifact whose sinks differ is refused, naming it."""
    tok = tiny_tokenizer()
    base = tiny_model("gpt_oss", 0)
    family = Family.from_models({"a": base, "b": derive_variant(base, 1)}, {"a": tok, "b": tok})
    with pytest.raises(SettingsError, match=r"GptOssAttention \(model.layers.0.self_attn\).*sinks.*swap mode"):
        Runtime(family, mode=CROSS)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
@torch.no_grad()
def test_other_decoder_only_families_serve_a_mixed_forward(arch):
    """The generic fused bank's families: routers that see [B*T, H] or [B, T, H], q/k norms
    of [B, T, heads, d], shared experts and their gates, DeepSeek's correction-bias buffer."""
    tok = tiny_tokenizer()
    base = tiny_model(arch, 0)
    models = {"a": base, "b": derive_variant(base, 1, changed_experts=[(0, 1)], scale=0.5)}
    family = Family.from_models(models, {n: tok for n in models})
    swap, cross = Runtime(family), Runtime(family, mode=CROSS)
    ids = torch.tensor(_ids(tok, ["The quick brown fox jumps"]) * 3)
    order = ["b", "a", "b"]
    with cross.variant_rows(order):
        mixed = cross.model(input_ids=ids).logits
    for i, name in enumerate(order):
        swap.activate(name)
        torch.testing.assert_close(mixed[i], swap.model(input_ids=ids[i : i + 1]).logits[0], **TOL)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)
