"""Families and helpers that test modules of several subpackages share."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers

from moeconsol.architectures.layouts import architecture
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.runtime import Runtime
from moeconsol.testing import SAMPLE_TEXT, derive_variant, save_model, tiny_mixtral, tiny_model, tiny_tokenizer

SEQ2SEQ = [
    {"input": "copy: fox dog", "target": "fox dog"},
    {"input": "upper: cat", "target": "CAT"},
    {"input": "a b c", "target": "c b a"},
]


def served_family(
    root: Path, tiny=tiny_mixtral, reference=transformers.MixtralForCausalLM, fine_tunes: int = 1, **runtime_options
):
    """A base (`tiny(0)`) and fine-tunes ('ft', 'ft2', ...) merged losslessly under `root`:
    (artifact, runtime, transformers' own models (`reference`) by name, tokenizer). Shared by
    the server tests of both serving modes and both architectures."""
    tok = tiny_tokenizer()
    base = tiny(0)
    models = {"base": base}
    for i in range(1, fine_tunes + 1):
        changed = [(0, i % 4), (1, (i + 1) % 4)]
        models["ft" if i == 1 else f"ft{i}"] = derive_variant(base, i, changed_experts=changed, scale=0.5)
    paths = {n: save_model(m, root / n, tok) for n, m in models.items()}
    merge(open_checkpoints([f"{n}={p}" for n, p in paths.items()]), root / "out")
    refs = {n: reference.from_pretrained(p).eval() for n, p in paths.items()}
    return root / "out", Runtime.from_artifact(root / "out", **runtime_options), refs, tok


def save_adapter(model, config, path: Path, seed: int) -> Path:
    """peft's LoRA adapter of `config` (a peft LoraConfig) on a copy of `model`, with random
    non-zero B (peft starts B at zero), saved as safetensors."""
    import copy

    from peft import get_peft_model  # peft: imported by the adapter tests only

    peft_model = get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(path, safe_serialization=True)
    return path


def peft_model(model_class, base: Path, adapter: Path, merged: bool = True):
    """What peft itself makes of base + adapter: merged (`merge_and_unload`) or as it runs it."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model_class.from_pretrained(base), adapter)
    return (model.merge_and_unload() if merged else model).eval()


def greedy(ref, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    return ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[
        0, len(ids) :
    ].tolist()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(metric, labels): value}, parsed here, independently of prometheus_client."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def correction_family(root, arch: str) -> dict:
    """Three fine-tunes of one base, each with some experts of its own; calibration data."""
    tok = tiny_tokenizer()
    base = tiny_model(arch, 11)
    fused = len(architecture(arch).layouts) > 1
    changed = {"a": [(0, 1), (1, 2), (1, 0)], "b": [(0, 1), (0, 3)], "c": [(0, 0), (1, 1), (1, 3)]}
    for i, (name, experts) in enumerate(changed.items()):
        save_model(derive_variant(base, i + 1, experts, scale=0.05), root / name, tok, fused=fused and name == "b")
    if architecture(arch).encoder_decoder:
        cal = root / "cal.jsonl"
        cal.write_text("".join(json.dumps(x) + "\n" for x in SEQ2SEQ * 4))
    else:
        cal = root / "cal.txt"
        cal.write_text(SAMPLE_TEXT * 3)
    return {"root": root, "models": [f"{n}={root / n}" for n in changed], "cal": str(cal)}


def merge_with_corrections(fam, out, budget="0.4", fmt=None, holdout=0.0):
    """calibrated + deltas; by default without the held-back check (holdout 0), so that the
    corrections plan itself is written (the check may write another candidate)."""
    ckpts = open_checkpoints(fam["models"])
    s = MergeSettings(
        mode="calibrated",
        budget=budget,
        calibration={"*": fam["cal"]},
        calibration_tokens=64,
        deltas=True,
        delta_format=fmt,
        holdout=holdout,
    )
    return ckpts, merge(ckpts, out, s)


def domain_text(kind: str, n: int, seed: int = 0) -> str:
    """n short documents of one style: `prose`, `numbers`, `code` or `lists`, made by a seeded
    generator (different kinds share few words, so a fine-tune on one gains on it alone)."""
    import random

    rng = random.Random(seed)
    words = ["fox", "dog", "model", "router", "expert", "token", "river", "stone", "light", "cloud"]
    docs = []
    for _ in range(n):
        if kind == "prose":
            docs.append(f"The {rng.choice(words)} saw the {rng.choice(words)} near the {rng.choice(words)}.")
        elif kind == "numbers":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            docs.append(f"{a} + {b} = {a + b}; {a} * 2 = {a * 2}.")
        elif kind == "code":
            name = rng.choice(words)
            docs.append(f"def {name}(a, b):\n    return a {rng.choice('+-*')} b\n")
        else:
            docs.append("[" + ", ".join(str(rng.randint(0, 9)) for _ in range(6)) + "]")
    return "\n".join(docs) + "\n"


def fine_tune(model, tokenizer, text: str, train: str, steps: int, lr: float, seed: int = 0, window: int = 32):
    """A copy of `model` trained on `text` (AdamW, batches of 4 random windows): `train` is
    `experts` (every experts module's parameters, the rest frozen) or `non-experts`."""
    import copy

    from moeconsol.testing import experts_modules

    model = copy.deepcopy(model).train()
    inside = tuple(f"{n}." for n in experts_modules(model))
    params = [p for n, p in model.named_parameters() if n.startswith(inside) == (train == "experts")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (4,), generator=g)
        batch = torch.stack([ids[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


QUANTIZED = [
    # family, method, save_quantized options, layout, experts the fine-tune changes
    ("deepseek_v3", "fp8", dict(block=(8, 16)), "deepseek_v3-fp8", [(0, 1), (1, 2)]),
    ("qwen3_moe", "fp8", dict(scale_dtype=torch.bfloat16), "qwen3_moe-fp8", [(1, 3)]),
    ("gpt_oss", "mxfp4", {}, "gpt_oss-mxfp4", [(0, 0), (1, 2)]),
]
"""Quantized releases, one row each: block FP8 as DeepSeek-V3 (F32 scales; a small block so
that tiny weights have several) and Qwen3 (BF16 scales, the releases' [128, 128]) store it,
MXFP4 as gpt-oss does."""
QUANTIZED_OVERRIDES = {"gpt_oss": dict(intermediate_size=32)}
"""MXFP4 groups 32 values: the tiny gpt-oss's intermediate size must be a multiple of 32."""


def quantized_family(root: Path, row: tuple) -> dict:
    """A tiny bf16 base and a fine-tune of it, both written as the release of `row` stores them
    (`testing.save_quantized`), under root/base and root/ft; experts the fine-tune left alone
    are bit-identical (codes and scales)."""
    arch, method, options, layout, changed = row
    from moeconsol.testing import save_quantized

    tok = tiny_tokenizer()
    base = tiny_model(arch, seed=5, dtype=torch.bfloat16, **QUANTIZED_OVERRIDES.get(arch, {}))
    save_quantized(base, root / "base", method, tok, **options)
    save_quantized(derive_variant(base, 1, changed, scale=0.05), root / "ft", method, tok, **options)
    return {"arch": arch, "root": root, "layout": layout, "changed": changed, "base_model": base}
