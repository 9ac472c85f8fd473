"""Tiny real models for tests, examples and benchmarks (like `numpy.testing`).

Everything here builds with transformers' own classes (MixtralConfig,
SwitchTransformersConfig) and a small byte-level BPE tokenizer trained on the spot, so no
download is ever needed. `derive_variant` makes a "fine-tune" whose chosen experts and
non-expert tensors differ from the base and whose other experts stay bit-identical, which
is what tests of sharing need; `examples/build_family.py` makes real fine-tunes by training.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch

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


def tiny_mixtral_config(vocab_size: int = 320, **overrides):
    from transformers import MixtralConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


def tiny_switch_config(vocab_size: int = 320, **overrides):
    from transformers import SwitchTransformersConfig

    kw = dict(
        vocab_size=vocab_size,
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
    )
    kw.update(overrides)
    return SwitchTransformersConfig(**kw)


def tiny_mixtral(seed: int = 0, **overrides):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(tiny_mixtral_config(**overrides)).eval()


def tiny_switch(seed: int = 0, **overrides):
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    return SwitchTransformersForConditionalGeneration(tiny_switch_config(**overrides)).eval()


def expert_parameters(model, layer: int, expert: int) -> list[torch.nn.Parameter]:
    """The parameters holding one expert, for either architecture (3-D fused tensors included)."""
    name = type(model).__name__
    if name.startswith("Mixtral"):
        experts = model.model.layers[layer].mlp.experts
        return [experts.gate_up_proj, experts.down_proj]
    blocks = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    return list(blocks[layer][f"expert_{expert}"].parameters())


def derive_variant(
    base,
    seed: int,
    changed_experts: Iterable[tuple[int, int]] = (),
    change_non_experts: bool = True,
    scale: float = 0.02,
):
    """A copy of `base` with noise added to the chosen (moe_layer_index, expert) experts and,
    optionally, to every non-expert tensor; all other experts stay bit-identical."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    changed = set(changed_experts)
    is_mixtral = type(model).__name__.startswith("Mixtral")
    with torch.no_grad():
        if is_mixtral:
            for li, layer in enumerate(model.model.layers):
                ex = layer.mlp.experts
                for e in range(ex.gate_up_proj.shape[0]):
                    if (li, e) in changed:
                        ex.gate_up_proj[e] += scale * torch.randn(ex.gate_up_proj[e].shape, generator=g)
                        ex.down_proj[e] += scale * torch.randn(ex.down_proj[e].shape, generator=g)
        else:
            blocks = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
            for li, block in enumerate(blocks):
                for e in range(len(block)):
                    if (li, e) in changed:
                        for p in block[f"expert_{e}"].parameters():
                            p += scale * torch.randn(p.shape, generator=g)
        if change_non_experts:
            for name, p in model.named_parameters():
                if "experts" not in name:
                    p += scale * torch.randn(p.shape, generator=g)
    return model


def save_model(model, path: str | Path, tokenizer=None, fused: bool = False, max_shard_size: str | int | None = None) -> Path:
    """save_pretrained in the per-expert layout (default) or the fused transformers 5 layout."""
    path = Path(path)
    kw = {"save_original_format": not fused}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
