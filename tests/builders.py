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


def served_family(root: Path, tiny=tiny_mixtral, reference=transformers.MixtralForCausalLM, **runtime_options):
    """A base (`tiny(0)`) and a fine-tune merged losslessly under `root`: (artifact, runtime,
    transformers' own models (`reference`) by name, tokenizer). Shared by the server tests of
    both serving modes and both architectures."""
    tok = tiny_tokenizer()
    base = tiny(0)
    models = {"base": base, "ft": derive_variant(base, 1, changed_experts=[(0, 1), (1, 2)], scale=0.5)}
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


def merge_with_corrections(fam, out, budget="0.4", fmt=None):
    ckpts = open_checkpoints(fam["models"])
    s = MergeSettings(
        mode="calibrated",
        budget=budget,
        calibration={"*": fam["cal"]},
        calibration_tokens=64,
        deltas=True,
        delta_format=fmt,
    )
    return ckpts, merge(ckpts, out, s)
