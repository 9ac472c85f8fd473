"""moeconsol at the size of released models: every step on families shaped like them, each
against a bound measured in the same run, extrapolated per layer to the whole model.

A family is a base and two fine-tunes written tensor by tensor with the released model's
tensor names and shapes (read from transformers' own model class built on the meta device:
nothing is allocated), synthetic bf16 weights, never a model in memory: each shard's header
is written first and its tensors streamed after it. A fine-tune changes `changed` experts of
every MoE layer and every non-expert tensor (the low mantissa bits, as a small fine-tune
does); the experts it leaves alone are bit-identical to the base's, and the shards holding
only those are hard links to the base's files (ext4 has no reflinks: three 13.8 GB OLMoE
checkpoints take 19 GB of disk instead of 41 GB). The page cache holds a hard-linked file
once; the I/O bounds read the same files, so ratios compare like with like.

Families (`--family`): `olmoe` (OLMoE-1B-7B-0924 whole: 16 layers x 64 experts, top-8),
`qwen3` (Qwen3-30B-A3B: 128 experts, top-8, 2 of 48 layers), `mixtral` (Mixtral-8x7B: 2 of 32
layers), `gpt-oss` (gpt-oss-20b in bf16: 2 of 24 layers), `deepseek-v2-lite` (3 of 27
layers: the dense first layer and two MoE layers). `--tiny` keeps the depth and expert
counts but shrinks every width (a smoke test of the script in seconds).

Steps, each in a subprocess polled for peak RSS (every 10 ms), each next to its bound:

| step | bound, measured right before it |
|---|---|
| analyze --metric cosine | `cat` of the inputs |
| merge (lossless; budget, reference where affordable) | `cat` of the inputs + a copy of the artifact, one file at a time, each synced and deleted |
| inspect | under 1 s |
| verify | `cat` of the artifact |
| runtime load (`Runtime.from_artifact`) | `cat` of the artifact |
| swap (fine-tune to fine-tune) | the fastest plain copy of the same bytes in the same process: torch's `copy_` (its thread pool) and one memcpy |
| decode (greedy, one thread) | transformers' model loaded from the fine-tune's checkpoint: same tokens, logits bit for bit, tokens/s |
| transformers load | `cat` of the fine-tune's files |
| export (the fine-tune) | a copy of its checkpoint, one file at a time; the export compared byte for byte |

Extrapolation: each step's time scales with the bytes it moves, so the whole released model
takes the slice's time x (the model's bytes / the slice's bytes); the per-layer figure is
the same for one decoder layer. Peak RSS of analyze and merge is one layer's worth whatever
the depth; the runtime holds the bank and the non-expert buffers (their bytes are exact).

Usage: python benchmarks/scale.py --family olmoe --keep /tmp/scale [--steps ...]
       [--host-buffers file|copy|both] [--json benchmarks/results/scale-olmoe.json]
The family is written under DIR/NAME (reused when present); artifacts and exports are
deleted when their steps are done. `--clean` deletes the family at the end.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from peer import communicate_polled  # noqa: E402

GB = 1e9
MiB = 1 << 20
CHUNK_ELEMENTS = 1 << 24
PROMPT = [11, 523, 1770, 318, 257, 1332, 286, 262, 4542, 13, 383, 2068, 7586]
"""Token ids of the decode prompt (every family's vocabulary has them)."""


# -- families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    model_type: str
    config: dict
    """the released model's config (whole depth)"""
    layers: int
    """decoder layers written (the slice)"""
    changed: int
    """experts each fine-tune changes in every MoE layer"""
    block: int
    """experts per shard (fine-tunes hard-link the shards whose experts they keep)"""
    modes: tuple[str, ...] = ("lossless",)
    tiny: dict = field(default_factory=dict)
    """config overrides of `--tiny`"""


_TINY = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, vocab_size=16384)

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "olmoe",
            "OLMoE-1B-7B-0924",
            "olmoe",
            dict(
                hidden_size=2048,
                intermediate_size=1024,
                num_hidden_layers=16,
                num_attention_heads=16,
                num_key_value_heads=16,
                num_experts=64,
                num_experts_per_tok=8,
                vocab_size=50304,
                max_position_embeddings=4096,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                norm_topk_prob=False,
                clip_qkv=None,
                pad_token_id=1,
                eos_token_id=50279,
                tie_word_embeddings=False,
            ),
            layers=16,
            changed=6,
            block=8,
            modes=("lossless", "budget", "reference"),
            tiny=dict(_TINY, intermediate_size=32),
        ),
        Family(
            "qwen3",
            "Qwen3-30B-A3B",
            "qwen3_moe",
            dict(
                hidden_size=2048,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_hidden_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                num_experts=128,
                num_experts_per_tok=8,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                vocab_size=151936,
                max_position_embeddings=40960,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                eos_token_id=151645,
            ),
            layers=2,
            changed=6,
            block=8,
            modes=("lossless", "budget", "reference"),
            tiny=dict(_TINY, moe_intermediate_size=32, head_dim=16),
        ),
        Family(
            "mixtral",
            "Mixtral-8x7B-v0.1",
            "mixtral",
            dict(
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                vocab_size=32000,
                max_position_embeddings=32768,
                rope_theta=1000000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            ),
            layers=2,
            changed=2,
            block=2,
            modes=("lossless", "budget", "reference"),
            tiny=dict(_TINY),
        ),
        Family(
            "gpt-oss",
            "gpt-oss-20b (bf16)",
            "gpt_oss",
            dict(
                hidden_size=2880,
                intermediate_size=2880,
                num_hidden_layers=24,
                num_attention_heads=64,
                num_key_value_heads=8,
                head_dim=64,
                num_local_experts=32,
                num_experts_per_tok=4,
                vocab_size=201088,
                sliding_window=128,
                layer_types=["sliding_attention", "full_attention"] * 12,
                max_position_embeddings=131072,
                rope_theta=150000.0,
                rope_scaling=dict(
                    rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096
                ),
                swiglu_limit=7.0,
                attention_bias=True,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                eos_token_id=200002,
                pad_token_id=199999,
            ),
            layers=2,
            changed=4,
            block=32,
            modes=("lossless", "budget", "reference"),
            tiny=dict(_TINY, head_dim=16),
        ),
        Family(
            "deepseek-v2-lite",
            "DeepSeek-V2-Lite",
            "deepseek_v2",
            dict(
                hidden_size=2048,
                intermediate_size=10944,
                moe_intermediate_size=1408,
                num_hidden_layers=27,
                num_attention_heads=16,
                num_key_value_heads=16,
                n_shared_experts=2,
                n_routed_experts=64,
                num_experts_per_tok=6,
                first_k_dense_replace=1,
                moe_layer_freq=1,
                kv_lora_rank=512,
                q_lora_rank=None,
                qk_nope_head_dim=128,
                qk_rope_head_dim=64,
                v_head_dim=128,
                topk_method="greedy",
                n_group=1,
                topk_group=1,
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
                vocab_size=102400,
                max_position_embeddings=163840,
                rope_theta=10000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                bos_token_id=100000,
                eos_token_id=100001,
            ),
            layers=3,
            changed=6,
            block=8,
            modes=("lossless", "budget", "reference"),
            tiny=dict(
                _TINY,
                intermediate_size=96,
                moe_intermediate_size=32,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=8,
            ),
        ),
    )
}


def family_config(f: Family, layers: int, tiny: bool) -> dict:
    cfg = dict(f.config, **(f.tiny if tiny else {}))
    cfg["num_hidden_layers"] = layers
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is not None and cfg[key] >= cfg["vocab_size"]:
            cfg[key] = None
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:layers]
    return cfg


def meta_tensors(model_type: str, config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """In-memory name -> (shape, dtype name) of transformers' model for `config`, built on the
    meta device (nothing allocated), in bf16."""
    import torch
    import transformers

    from moeconsol.architectures.layouts import architecture

    record = architecture(model_type)
    cfg = getattr(transformers, record.config_class).from_dict(dict(config, model_type=model_type))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = getattr(transformers, record.model_class)(cfg)
    finally:
        torch.set_default_dtype(previous)
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    return {n: (tuple(t.shape), names[t.dtype]) for n, t in model.state_dict().items()}


# -- writing a family -------------------------------------------------------------------------


@dataclass
class Spec:
    """One on-disk tensor: name, shape, and how its values are made."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    """weight | norm | bias"""
    experts: int = 0
    """a fused expert tensor: experts along dim 0 (each slice made on its own)"""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (2 if self.dtype == "BF16" else 4)


def _kind(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) == 1 and "norm" in name:
        return "norm"
    return "bias" if len(shape) == 1 or name.endswith(("bias", "sinks")) else "weight"


def disk_tensors(model_type: str, config: dict) -> tuple[dict[str, list[Spec]], list[Spec]]:
    """The checkpoint's on-disk tensors in the family's released layout: (MoE layer ->
    its experts' tensors, every expert's own, or the fused ones), non-expert tensors."""
    from moeconsol.architectures.layouts import architecture

    record = architecture(model_type)
    layout = record.layouts[0]
    experts: dict[str, list[Spec]] = {}
    rest: list[Spec] = []
    for name, (shape, dtype) in meta_tensors(model_type, config).items():
        if ".mlp.experts." not in name:
            rest.append(Spec(layout.disk_name(name), shape, dtype, _kind(name, shape)))
            continue
        layer, fused = name.split(".mlp.experts.")
        if layout.fused_parts:  # gpt-oss: fused on disk as in memory
            experts.setdefault(layer, []).append(Spec(name, shape, dtype, _kind(name, shape), experts=shape[0]))
            continue
        parts = record.memory_layout.fused_parts[fused]
        e, rows, cols = shape
        for j in range(e):
            for p in parts:
                experts.setdefault(layer, []).append(
                    Spec(layout.expert_name(layer, j, p), (rows // len(parts), cols), dtype, "weight")
                )
    for layer in experts:  # per-expert tensors in expert order
        experts[layer].sort(key=lambda s: _expert_of(s.name))
    return experts, rest


def _expert_of(name: str) -> int:
    if ".experts." not in name:
        return -1
    tail = name.split(".experts.")[1].split(".")[0]
    return int(tail) if tail.isdigit() else -1


def _values(seed: int, n: int, kind: str, dtype: str) -> np.ndarray:
    """n synthetic values as raw bytes (uint16 bf16 bit patterns, or float32), from `seed`."""
    rng = np.random.default_rng(seed)
    if dtype == "F32":
        scale = {"norm": 0.0, "bias": 0.001, "weight": 0.02}[kind]
        return (rng.standard_normal(n, dtype=np.float32) * scale + (1.0 if kind == "norm" else 0.0)).view(np.uint8)
    r = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    if kind == "norm":
        return (np.uint16(0x3F80) | (r & np.uint16(7))).view(np.uint8)  # 1.0 .. 1.05
    low = 112 if kind == "bias" else 119  # exponents: weights 2^-8 .. 2^-4, biases 2^-15 .. 2^-11
    exponent = ((r >> np.uint16(7)) & np.uint16(3)) + np.uint16(low)
    return ((r & np.uint16(0x807F)) | (exponent << np.uint16(7))).view(np.uint8)


def _perturb(raw: np.ndarray, seed: int, dtype: str, variant: int) -> np.ndarray:
    """Fine-tune `variant`'s version: the low mantissa bits of every element changed at random."""
    rng = np.random.default_rng([seed, variant])
    if dtype == "F32":
        v = raw.view(np.uint32)
        return (v ^ rng.integers(0, 1 << 12, v.size, dtype=np.uint32)).view(np.uint8)
    v = raw.view(np.uint16)
    return (v ^ rng.integers(0, 4, v.size, dtype=np.uint16)).view(np.uint8)


def _seed(name: str, piece: int) -> int:
    return zlib.crc32(f"{name}#{piece}".encode())


def _pieces(spec: Spec) -> list[tuple[int, int, int]]:
    """(piece id, elements, expert or -1): what is made on its own (an expert's slice of a
    fused tensor, or a chunk of at most CHUNK_ELEMENTS)."""
    n = math.prod(spec.shape)
    if spec.experts:
        per = n // spec.experts
        return [(j, per, j) for j in range(spec.experts)]
    return [(i, min(CHUNK_ELEMENTS, n - s), -1) for i, s in enumerate(range(0, n, CHUNK_ELEMENTS))]


def write_shard(path: Path, specs: list[Spec], variant: int, changed: set[int], all_changed: bool) -> None:
    """One safetensors shard: its header first, then each tensor streamed a piece at a time.
    `changed`: the experts whose values the variant changes (`all_changed`: every tensor)."""
    from moeconsol.io.writer import TensorSpec, safetensors_header

    head = safetensors_header([TensorSpec(s.name, s.dtype, s.shape) for s in specs], {"format": "pt"})
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(head)
        for s in specs:
            expert = _expert_of(s.name) if not s.experts else -1
            for piece, n, fused_expert in _pieces(s):
                values = _values(_seed(s.name, piece), n, s.kind, s.dtype)
                which = fused_expert if s.experts else expert
                if all_changed or which in changed:
                    values = _perturb(values, _seed(s.name, piece), s.dtype, variant)
                f.write(values.data)
    tmp.rename(path)


def changed_experts(variant: int, family: Family, experts: int) -> set[int]:
    """The experts fine-tune `variant` (1, 2) changes in every MoE layer: the first of its own block."""
    block = min(family.block, experts)
    start = ((variant - 1) * block) % experts
    return set(range(start, start + min(family.changed, block)))


def write_family(root: Path, family: Family, tiny: bool) -> list[Path]:
    """base, ft1, ft2 under root (each written when missing): shards of `block` experts of one
    layer, the non-expert tensors in shards of their own; a fine-tune hard-links the expert
    shards it leaves unchanged."""
    config = family_config(family, family.layers, tiny)
    experts, rest = disk_tensors(family.model_type, config)
    names = ["base", "ft1", "ft2"]
    dirs = [root / n for n in names]
    done = [(d / "model.safetensors.index.json").exists() for d in dirs]
    if all(done):
        return dirs
    if not done[0]:  # the fine-tunes hard-link the base's files: they are written after it
        shutil.rmtree(root, ignore_errors=True)
        done = [False] * len(dirs)
    shards: list[tuple[str, list[Spec], int | None]] = []  # (file, tensors, first expert or None)
    group, size = [], 0
    for s in rest:
        if group and size + s.nbytes > 2 * GB:
            shards.append((f"nonexpert-{len(shards):03d}", group, None))
            group, size = [], 0
        group.append(s)
        size += s.nbytes
    shards.append((f"nonexpert-{len(shards):03d}", group, None))
    for layer, specs in experts.items():
        if specs[0].experts:  # fused: one shard per layer
            shards.append((f"{layer}-experts", specs, 0))
            continue
        per = len(specs) // len({_expert_of(s.name) for s in specs})
        for start in range(0, len(specs), family.block * per):
            shards.append(
                (f"{layer}-experts-{start // per:03d}", specs[start : start + family.block * per], start // per)
            )
    n_experts = max(
        len({_expert_of(s.name) for s in specs}) if not specs[0].experts else specs[0].experts
        for specs in experts.values()
    )
    started = time.perf_counter()
    for v, d in enumerate(dirs):
        if done[v]:  # complete (its index is written last)
            continue
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cfg = dict(config, model_type=family.model_type, torch_dtype="bfloat16")
        cfg["architectures"] = [_model_class(family.model_type)]
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        changed = changed_experts(v, family, n_experts) if v else set()
        weight_map = {}
        for i, (_, specs, first) in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            weight_map.update({s.name: file for s in specs})
            touched = v > 0 and (first is None or any(_expert_of(s.name) in changed for s in specs) or specs[0].experts)
            if v and not touched:
                os.link(dirs[0] / file, d / file)
            else:
                write_shard(d / file, specs, v, changed, all_changed=v > 0 and first is None)
        total = sum((d / f).stat().st_size for f in set(weight_map.values()))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        print(f"  wrote {d} ({total / GB:.2f} GB, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    os.sync()
    return dirs


def _model_class(model_type: str) -> str:
    from moeconsol.architectures.layouts import architecture

    return architecture(model_type).model_class


# -- measuring --------------------------------------------------------------------------------


class StepFailed(Exception):
    """A step's subprocess failed: why, and its peak RSS until then."""

    def __init__(self, why: str, peak: int):
        super().__init__(why)
        self.why, self.peak = why, peak


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (polled every 10 ms) and stdout of a subprocess; StepFailed if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err, peak = communicate_polled(proc)
    if proc.returncode != 0:
        why = "killed (-9: out of memory)" if proc.returncode == -9 else f"exit {proc.returncode}: {err[-300:]}"
        raise StepFailed(why, peak)
    return time.perf_counter() - start, peak, out


def files_of(d: Path) -> list[Path]:
    return sorted(f for f in d.rglob("*") if f.is_file())


def read_bound(files: list[Path]) -> float:
    """Seconds of `cat FILES > /dev/null`."""
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)], check=True)
    return time.perf_counter() - t0


def hash_bound(files: list[Path]) -> float:
    """Seconds of `sha256sum FILES`, four files at once (as the runtime's load reads them)."""
    t0 = time.perf_counter()
    subprocess.run(
        ["sh", "-c", 'printf "%s\\0" "$@" | xargs -0 -P 4 -n 8 sha256sum > /dev/null', "h", *map(str, files)],
        check=True,
    )
    return time.perf_counter() - t0


def copy_bound(files: list[Path], scratch: Path) -> float:
    """Seconds to copy FILES (read + write + sync), one at a time, each copy deleted after its
    sync (disk use: the largest file)."""
    scratch.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for f in files:
        target = scratch / "copy"
        t0 = time.perf_counter()
        shutil.copyfile(f, target)
        os.sync()
        total += time.perf_counter() - t0
        target.unlink()
    return total


def moeconsol(*args: str) -> list[str]:
    return [sys.executable, "-m", "moeconsol", *args]


def nbytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


# -- child processes: the runtime and transformers -------------------------------------------


def child_runtime(artifact: str, decode: str, tokens: int, host_buffers: str) -> dict:
    """Load the artifact, time swaps between the fine-tunes and the plain copies of the same
    bytes, decode greedily on one thread; print JSON."""
    import torch

    from moeconsol.serving import Runtime

    t0 = time.perf_counter()
    kw = {"host_buffers": host_buffers.split("-")[0]} if host_buffers != "default" else {}
    if host_buffers.endswith("-unchecked"):
        kw["checksums"] = False
    rt = Runtime.from_artifact(artifact, **kw)
    load = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    names = rt.names
    swaps = []
    for a, b in [(names[0], names[1]), (names[1], names[2]), (names[2], names[1]), (names[1], names[2])]:
        rt.activate(a)
        swaps.append(rt.activate(b).to_dict())
    # the bound: the same bytes copied plainly, from the resident swap region into one more
    # buffer of its size (a second full copy would not fit beside a big bank)
    src = max((f.swap_region for f in rt._flats.values()), key=lambda t: t.numel() * t.element_size())
    dst = torch.empty_like(src)
    copies = {"torch_copy": [], "memcpy": [], "bytes": src.numel() * src.element_size()}
    for _ in range(4):
        t = time.perf_counter()
        dst.copy_(src)
        copies["torch_copy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
        copies["memcpy"].append(time.perf_counter() - t)
    del dst
    out = {
        "load_seconds": load,
        "rss_after_load": rss_loaded,
        "resident": rt.resident_bytes().to_dict(),
        "swaps": swaps,
        "copies": copies,
        "threads": torch.get_num_threads(),
    }
    if decode:
        rt.activate(decode)
        torch.set_num_threads(1)
        out.update(_decode(rt.model, tokens))
    print(json.dumps(out))
    return out


def child_transformers(path: str, tokens: int, logits_file: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    load = time.perf_counter() - t0
    torch.set_num_threads(1)
    out = {"load_seconds": load, **_decode(model, tokens)}
    print(json.dumps(out))


def _decode(model, tokens: int) -> dict:
    import torch

    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
        t0 = time.perf_counter()
        generated = model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        seconds = time.perf_counter() - t0
    return {
        "tokens": generated[0, len(PROMPT) :].tolist(),
        "decode_seconds": seconds,
        "logits_sha": _sha(logits),
        "logits_head": logits[:4].tolist(),
    }


def _sha(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().view(-1).numpy().tobytes()).hexdigest()


# -- the run ----------------------------------------------------------------------------------


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(
        self, step: str, seconds: float, bound: float | None, bound_what: str, rss: int | None, note: str = ""
    ) -> None:
        row = {"step": step, "seconds": round(seconds, 3), "bound_seconds": None if bound is None else round(bound, 3)}
        row.update(bound=bound_what, peak_rss_mib=None if rss is None else round(rss / MiB), note=note)
        row["ratio"] = None if not bound else round(seconds / bound, 2)
        self.rows.append(row)
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        b = f"{bound:.2f} s" if bound is not None else "-"
        mem = f"{rss / MiB:.0f} MiB" if rss is not None else "-"
        print(
            f"  {step:<34} {seconds:9.2f} s  bound {b:>10} ({bound_what}) {ratio:>7}  peak RSS {mem:>10}  {note}",
            flush=True,
        )


def _failed(table: Table, step: str, e: StepFailed) -> None:
    table.rows.append(
        dict(step=step, seconds=None, bound_seconds=None, bound="", peak_rss_mib=round(e.peak / MiB), note=e.why)
    )
    table.rows[-1]["ratio"] = None
    print(f"  {step:<34} FAILED: {e.why} (peak RSS {e.peak / MiB:.0f} MiB)", flush=True)


def run(args: argparse.Namespace) -> dict:
    family = FAMILIES[args.family]
    root = args.keep / (family.name + ("-tiny" if args.tiny else ""))
    scratch = args.keep / "scratch"
    print(f"{family.label}: writing or reusing {root}", file=sys.stderr)
    t0 = time.perf_counter()
    dirs = write_family(root, family, args.tiny)
    write_seconds = time.perf_counter() - t0
    models = [f"{d.name}={d}" for d in dirs]
    inputs = [f for d in dirs for f in files_of(d) if f.suffix == ".safetensors"]
    table = Table()
    steps = args.steps.split(",")
    load = [os.getloadavg()[0]]
    result: dict = {"family": family.name, "label": family.label, "tiny": args.tiny, "rows": table.rows}
    result["layers_written"] = family.layers
    result["input_bytes"] = nbytes(inputs)
    result["input_bytes_on_disk"] = nbytes(list({f.stat().st_ino: f for f in inputs}.values()))
    print(
        f"inputs: 3 x {nbytes(files_of(dirs[0])) / GB:.2f} GB ({result['input_bytes_on_disk'] / GB:.2f} GB on disk), "
        f"written or found in {write_seconds:.0f} s; load average {load[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    if "analyze" in steps:
        bound = read_bound(inputs)
        s, rss, _ = measured(moeconsol("analyze", *models, "--metric", "cosine", "--json", str(root / "report.json")))
        table.add("analyze --metric cosine", s, bound, "cat inputs", rss)
    art = args.keep / f"{root.name}-art"
    modes = [m for m in family.modes if m in steps or "merge" in steps and m == "lossless"]
    for mode in modes:
        out = art if mode == "lossless" else args.keep / f"{root.name}-art-{mode}"
        if mode == "lossless" and (out / "manifest.json").exists() and args.reuse_artifact:
            print(f"  reusing {out}", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        opts = [] if mode == "lossless" else ["--mode", mode, "--budget", "0.3"]
        read = read_bound(inputs)
        s, rss, _ = measured(moeconsol("merge", *models, "-o", str(out), *opts))
        os.sync()
        s2 = s  # includes its own fsyncs; the sync above is for the bound's sake
        write = copy_bound(files_of(out), scratch)
        manifest = json.loads((out / "manifest.json").read_text())
        bank = sum(len(x["bank"]) for x in manifest["layers"])
        note = f"bank {bank} experts, artifact {nbytes(files_of(out)) / GB:.2f} GB"
        table.add(f"merge {mode}", s2, read + write, "cat inputs + copy artifact", rss, note)
        result.setdefault("artifact_bytes", {})[mode] = nbytes(files_of(out))
        if mode == "lossless":
            result["bank_experts"] = bank
        else:
            shutil.rmtree(out)
    art_files = files_of(art) if art.exists() else []
    if "inspect" in steps and art_files:
        s, rss, _ = measured(moeconsol("inspect", str(art)))
        table.add(
            "inspect", s, 1.0, "goal: 1 s", rss, f"manifest {(art / 'manifest.json').stat().st_size / MiB:.1f} MiB"
        )
    if "verify" in steps and art_files:
        bound = read_bound(art_files)
        hashed = hash_bound(art_files)
        table.add(
            "sha256sum artifact, 4 at once",
            hashed,
            bound,
            "cat artifact",
            None,
            "coreutils' sha256sum: a reference, not a floor",
        )
        s, rss, _ = measured(moeconsol("verify", str(art)))
        table.add("verify", s, bound, "cat artifact", rss)
    ft = dirs[1]
    if "runtime" in steps and art_files:
        for host in ["file", "copy"] if args.host_buffers == "both" else args.host_buffers.split(","):
            bound = read_bound(art_files)
            cmd = [
                sys.executable,
                __file__,
                "--child-runtime",
                str(art),
                "--decode",
                ft.name,
                "--tokens",
                str(args.tokens),
            ]
            try:
                s, rss, out = measured(cmd + ["--host-buffers", host])
            except StepFailed as e:
                _failed(table, f"runtime load (host {host})", e)
                continue
            child = json.loads(out.strip().splitlines()[-1])
            result.setdefault("runtime", {})[host] = child
            table.add(f"runtime load (host {host})", child["load_seconds"], bound, "cat artifact", rss)
            swaps = child["swaps"][1:]
            swap = min(x["seconds"] for x in swaps)
            copy = min(min(child["copies"]["torch_copy"]), min(child["copies"]["memcpy"]))
            table.add(
                f"swap ft1 <-> ft2 (host {host})",
                swap,
                copy,
                "fastest plain copy",
                None,
                f"{swaps[0]['bytes_moved'] / MiB:.0f} MiB; torch copy_ {min(child['copies']['torch_copy']) * 1e3:.0f} ms, memcpy {min(child['copies']['memcpy']) * 1e3:.0f} ms",
            )
            result["runtime"][host]["peak_rss"] = rss
    if "transformers" in steps:
        ft_files = [f for f in files_of(ft) if f.suffix == ".safetensors"]
        bound = read_bound(ft_files)
        cmd = [sys.executable, __file__, "--child-transformers", str(ft), "--tokens", str(args.tokens)]
        s, rss, out = measured(cmd)
        child = json.loads(out.strip().splitlines()[-1])
        result["transformers"] = child
        table.add("transformers load (ft1)", child["load_seconds"], bound, "cat ft1", rss)
        rt = result.get("runtime", {})
        for host, r in rt.items():
            same_tokens = r["tokens"] == child["tokens"]
            same_logits = r["logits_sha"] == child["logits_sha"]
            tps, tps_ref = args.tokens / r["decode_seconds"], args.tokens / child["decode_seconds"]
            table.add(
                f"decode {args.tokens} tokens (host {host})",
                r["decode_seconds"],
                child["decode_seconds"],
                "transformers",
                None,
                f"{tps:.2f} vs {tps_ref:.2f} tok/s; tokens {'equal' if same_tokens else 'DIFFER'}, logits {'bit-identical' if same_logits else 'DIFFER'}",
            )
            r["same_tokens"], r["same_logits"] = same_tokens, same_logits
    if "export" in steps and art_files:
        out = args.keep / f"{root.name}-export"
        shutil.rmtree(out, ignore_errors=True)
        ft_files = files_of(ft)
        need = nbytes(ft_files) + 2 * GB
        free = shutil.disk_usage(args.keep).free
        if free < need:
            print(f"  export skipped: {free / GB:.1f} GB free, {need / GB:.1f} GB needed", flush=True)
        else:
            s, rss, _ = measured(moeconsol("export", str(art), ft.name, "-o", str(out)))
            same = all(
                filecmp.cmp(f, out / f.relative_to(ft), shallow=False) for f in ft_files if f.suffix == ".safetensors"
            )
            write = copy_bound([f for f in ft_files if f.suffix == ".safetensors"], scratch)
            table.add("export ft1", s, write, "copy ft1", rss, "shards byte-identical" if same else "shards DIFFER")
            result["export_identical"] = same
            shutil.rmtree(out)
    shutil.rmtree(scratch, ignore_errors=True)
    load.append(os.getloadavg()[0])
    result["load_average"] = load
    result["extrapolated"] = extrapolate(family, result, args.tiny)
    print_extrapolation(family, result)
    if args.drop_artifact:
        shutil.rmtree(art, ignore_errors=True)
    return result


def extrapolate(family: Family, result: dict, tiny: bool) -> dict:
    """Bytes of the slice, one decoder layer and the whole released model (counted on
    transformers' model on the meta device), and each step's time scaled by bytes."""
    whole = meta_tensors(family.model_type, family_config(family, family.config["num_hidden_layers"], tiny))
    sliced = meta_tensors(family.model_type, family_config(family, family.layers, tiny))
    size = lambda t: sum(math.prod(s) * (2 if d == "BF16" else 4) for s, d in t.values())  # noqa: E731
    whole_bytes, slice_bytes = size(whole), size(sliced)
    last = f"model.layers.{family.layers - 1}."
    layer_bytes = sum(math.prod(s) * 2 for n, (s, d) in sliced.items() if n.startswith(last))
    scale = whole_bytes / slice_bytes
    return {
        "slice_bytes": slice_bytes,
        "layer_bytes": layer_bytes,
        "whole_bytes": whole_bytes,
        "layers": family.config["num_hidden_layers"],
        "steps": [
            {
                "step": r["step"],
                "per_layer_seconds": round(r["seconds"] * layer_bytes / slice_bytes, 3),
                "whole_seconds": round(r["seconds"] * scale, 1),
                "whole_bound_seconds": None if r["bound_seconds"] is None else round(r["bound_seconds"] * scale, 1),
            }
            for r in result["rows"]
            if not r["step"].startswith(("inspect", "swap", "decode")) and r["seconds"] is not None
        ],
    }


def print_extrapolation(family: Family, result: dict) -> None:
    x = result["extrapolated"]
    print(
        f"\n{family.label}: slice {x['slice_bytes'] / GB:.2f} GB, one layer {x['layer_bytes'] / GB:.3f} GB, "
        f"whole model {x['layers']} layers {x['whole_bytes'] / GB:.1f} GB (x{x['whole_bytes'] / x['slice_bytes']:.1f})"
    )
    for s in x["steps"]:
        bound = f"{s['whole_bound_seconds']:.0f} s" if s["whole_bound_seconds"] is not None else "-"
        print(
            f"  {s['step']:<34} per layer {s['per_layer_seconds']:7.2f} s   whole model {s['whole_seconds']:8.0f} s (bound {bound})"
        )


STEP_ORDER = (
    "analyze",
    "merge",
    "inspect",
    "sha256sum",
    "verify",
    "runtime",
    "swap",
    "transformers",
    "decode",
    "export",
    "",
)


def appended(old: dict, new: dict, family: Family, tiny: bool) -> dict:
    """An earlier run's results with this run's steps put in (a step run again replaces its
    row in place); the load averages of both runs kept."""
    rows = {r["step"]: r for r in new["rows"]}
    merged = [rows.pop(r["step"], r) for r in old["rows"]] + list(rows.values())
    merged.sort(key=lambda r: next(i for i, p in enumerate(STEP_ORDER) if r["step"].startswith(p)))
    out = {**old, **new, "rows": merged, "load_average": old["load_average"] + new["load_average"]}
    out["extrapolated"] = extrapolate(family, out, tiny)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILIES))
    ap.add_argument("--keep", type=Path, help="where families and artifacts are written (outside the repository)")
    ap.add_argument("--tiny", action="store_true", help="every width shrunk: a smoke test of the script")
    ap.add_argument("--steps", default="analyze,merge,budget,reference,inspect,verify,runtime,transformers,export")
    ap.add_argument(
        "--host-buffers",
        default="default",
        help="copy | file | both | default (the Runtime's default), or a list; NAME-unchecked: without sha256 checks",
    )
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--reuse-artifact", action="store_true", help="keep a lossless artifact from an earlier run")
    ap.add_argument("--drop-artifact", action="store_true", help="delete the lossless artifact at the end")
    ap.add_argument("--clean", action="store_true", help="delete the family at the end")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--append", action="store_true", help="put this run's steps into the --json file's results")
    ap.add_argument("--child-runtime", help=argparse.SUPPRESS)
    ap.add_argument("--child-transformers", help=argparse.SUPPRESS)
    ap.add_argument("--decode", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_runtime:
        child_runtime(args.child_runtime, args.decode, args.tokens, args.host_buffers)
        return
    if args.child_transformers:
        child_transformers(args.child_transformers, args.tokens, "")
        return
    if not args.family or not args.keep:
        ap.error("--family and --keep are required")
    args.keep.mkdir(parents=True, exist_ok=True)
    result = run(args)
    if args.json and args.append and args.json.exists():
        result = appended(json.loads(args.json.read_text()), result, FAMILIES[args.family], args.tiny)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.clean:
        shutil.rmtree(args.keep / (args.family + ("-tiny" if args.tiny else "")), ignore_errors=True)


if __name__ == "__main__":
    main()
