"""Tiny real models for tests, examples and benchmarks (like `numpy.testing`).

Everything here builds with transformers' own classes (every architecture of
`layouts.ARCHITECTURES`, from `TINY_CONFIGS`) and a small byte-level BPE tokenizer trained on the spot, so no
download is ever needed. `derive_variant` makes a "fine-tune" whose chosen experts and
non-expert tensors differ from the base and whose other experts stay bit-identical, which
is what tests of sharing need; `examples/build_family.py` makes real fine-tunes by training.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch

from .architectures.layouts import architecture as record

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Experts are small feed-forward networks; "
    "a router picks two of them for every token. def add(a, b):\n    return a + b\n"
    "Once upon a time there was a model that served many fine-tunes from one GPU. "
    "0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; :"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(text: str = SAMPLE_TEXT, vocab_size: int = 320):
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast) with pad/eos/bos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_ATTENTION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256
)
_DEEPSEEK = dict(
    {k: v for k, v in _ATTENTION.items() if k not in ("num_hidden_layers", "num_key_value_heads")},
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(**_TOKENS, **_ATTENTION, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        **_TOKENS,
        **_ATTENTION,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        **_TOKENS,
        **_ATTENTION,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
    ),
    "olmoe": dict(**_TOKENS, **_ATTENTION, intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(**_TOKENS, **_DEEPSEEK, num_hidden_layers=3),
    "deepseek_v3": dict(**_TOKENS, **_DEEPSEEK, num_hidden_layers=3),
    "gpt_oss": dict(
        **_TOKENS, **_ATTENTION, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8
    ),
    "switch_transformers": dict(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        expert_capacity=64,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    ),
}
"""Tiny configs of every architecture in `layouts.ARCHITECTURES` (4 experts, hidden size 32)."""


def tiny_config(architecture: str, vocab_size: int = 320, **overrides):
    """A tiny transformers config of `architecture` (a `layouts.ARCHITECTURES` name)."""
    import transformers

    kw = dict(TINY_CONFIGS[architecture], vocab_size=vocab_size)
    kw.update(overrides)
    return getattr(transformers, record(architecture).config_class)(**kw)


def tiny_model(architecture: str, seed: int = 0, *, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised model of `architecture` (tiny unless `overrides` say otherwise),
    made directly in `dtype` (no float32 copy on the way), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = getattr(transformers, record(architecture).model_class)(tiny_config(architecture, **overrides)).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # transformers initialises expert biases (gpt-oss) to 0; trained ones are not
        for experts in experts_modules(model).values():
            for name, p in experts.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    p.normal_(0.0, 0.02)
    return model


def tiny_mixtral_config(vocab_size: int = 320, **overrides):
    return tiny_config("mixtral", vocab_size, **overrides)


def tiny_switch_config(vocab_size: int = 320, **overrides):
    return tiny_config("switch_transformers", vocab_size, **overrides)


def tiny_mixtral(seed: int = 0, **overrides):
    return tiny_model("mixtral", seed, **overrides)


def tiny_switch(seed: int = 0, **overrides):
    return tiny_model("switch_transformers", seed, **overrides)


def experts_modules(model) -> dict[str, torch.nn.Module]:
    """Each MoE layer's experts module, by name (shared experts are not among them)."""
    return {n: m for n, m in model.named_modules() if n.endswith(".mlp.experts")}


def expert_parameters(model, layer: int, expert: int) -> list[torch.nn.Parameter]:
    """The parameters holding one expert, for any architecture (3-D fused tensors included)."""
    experts = list(experts_modules(model).values())[layer]
    if hasattr(experts, f"expert_{expert}"):
        return list(experts[f"expert_{expert}"].parameters())
    return list(experts.parameters(recurse=False))


def derive_variant(
    base,
    seed: int,
    changed_experts: Iterable[tuple[int, int]] = (),
    change_non_experts: bool = True,
    scale: float = 0.02,
):
    """A copy of `base` with noise added to the chosen (moe_layer_index, expert) experts and,
    optionally, to every non-expert tensor (shared experts and persistent float buffers such
    as DeepSeek-V3's `e_score_correction_bias` included); all other experts stay bit-identical."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    changed = set(changed_experts)
    modules = experts_modules(model)
    with torch.no_grad():
        for li, experts in enumerate(modules.values()):
            for e in range(experts.num_experts):
                if (li, e) not in changed:
                    continue
                if hasattr(experts, f"expert_{e}"):
                    for p in experts[f"expert_{e}"].parameters():
                        p += scale * torch.randn(p.shape, generator=g)
                else:
                    for p in experts.parameters(recurse=False):
                        p[e] += scale * torch.randn(p[e].shape, generator=g)
        if change_non_experts:
            inside = tuple(f"{n}." for n in modules)
            for name, p in model.named_parameters():
                if not name.startswith(inside):
                    p += scale * torch.randn(p.shape, generator=g)
            params = dict(model.named_parameters())
            for name, t in model.state_dict(keep_vars=True).items():
                if name not in params and not name.startswith(inside) and t.is_floating_point():
                    t += scale * torch.randn(t.shape, generator=g)
    return model


def save_model(
    model, path: str | Path, tokenizer=None, fused: bool = False, max_shard_size: str | int | None = None
) -> Path:
    """save_pretrained in the per-expert layout (default) or the fused transformers 5 layout."""
    path = Path(path)
    kw = {"save_original_format": not fused}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
"""gpt-oss releases' `quantization_config.modules_to_not_convert`."""


def _fp8_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether block FP8 releases (DeepSeek-V3, Qwen3 -FP8) store this tensor quantized: every
    linear weight but the embeddings, the output head and the routers."""
    skipped = ("embed_tokens.weight", "lm_head.weight", ".mlp.gate.weight")
    return tensor.dim() == 2 and name.endswith(".weight") and not name.endswith(skipped)


def save_quantized(
    model,
    path: str | Path,
    method: str,
    tokenizer=None,
    block: tuple[int, int] = (128, 128),
    scale_dtype: torch.dtype = torch.float32,
) -> Path:
    """`save_model`, then the weights rewritten the way the quantized releases store them:
    `method` "fp8" (DeepSeek-V3/R1, Qwen3 -FP8: every linear weight but embeddings, head and
    routers as F8_E4M3 codes with `weight_scale_inv` per `block`, DeepSeek's F32 or Qwen3's
    BF16) or "mxfp4" (gpt-oss: expert weights as `_blocks` and `_scales`, biases and the rest
    as they are); config.json gets the releases' `quantization_config`. The same weights give
    the same bytes, so experts a fine-tune left alone stay bit-identical."""
    import json

    from safetensors.torch import load_file, save_file

    from .io.quant import fp8, mxfp4

    path = save_model(model, path, tokenizer)
    files = sorted(path.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    for file in files:
        tensors = load_file(file)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if method == "fp8" and _fp8_quantized(name, t):
                out[name], out[name.removesuffix(".weight") + ".weight_scale_inv"] = fp8.quantize(t, block, scale_dtype)
            elif method == "mxfp4" and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                pairs = [mxfp4.quantize(t[e].T) for e in range(t.shape[0])]
                out[name + "_blocks"] = torch.stack([b for b, _ in pairs])
                out[name + "_scales"] = torch.stack([s for _, s in pairs])
            else:
                out[name] = t.contiguous()
        save_file(out, file, metadata={"format": "pt"})
        weight_map.update({n: file.name for n in out})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((path / "config.json").read_text())
    if method == "fp8":
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        }
    else:
        config["quantization_config"] = {"modules_to_not_convert": MXFP4_NOT_CONVERTED, "quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
