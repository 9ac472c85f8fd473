"""LoRA adapters served unmerged (`serve-local --adapter`) against the same adapters merged
into the artifact: resident memory and decode speed, in the same run.

Builds a Mixtral-shaped base (hidden 512, expert FFN 1024, 4 MoE layers x 8 experts, vocab
8192, float32) and four peft LoRA adapters on its attention (q, k, v, o; r 16, B random).
Then:

- merged: `moeconsol merge` of the base and the four adapters (lossless: the experts are
  shared, each adapter's attention weights stored) served by one runtime;
- unmerged: an artifact of the base alone, served with the four adapters as `--adapter`.

For each: resident bytes (device: bank + non-expert + adapters) and host bytes (the
variants' weights waiting to be swapped in), and decode speed with the engine (greedy,
`--tokens` new tokens after a short prompt, one request at a time): one adapter's requests
back to back (no swap) and the four adapters round-robin (a swap per request when merged).
Ratios are unmerged / merged.

Usage: python benchmarks/lora_serving.py [--tokens 48] [--rounds 3] [--keep DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moeconsol.consolidate import merge  # noqa: E402
from moeconsol.io.checkpoint import open_checkpoints  # noqa: E402
from moeconsol.serving.engine import GenerationSettings, complete  # noqa: E402
from moeconsol.serving.runtime import Runtime  # noqa: E402
from moeconsol.testing import save_model, tiny_mixtral, tiny_tokenizer  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, EXPERTS, VOCAB, RANK, ADAPTERS = 512, 1024, 4, 8, 8192, 16, 4
MiB = 1024**2
PROMPT = "the quick brown fox jumps over the lazy dog and"


def build(root: Path) -> tuple[Path, dict[str, Path]]:
    """The base and the adapters, built once under `root`."""
    import copy

    from peft import LoraConfig, get_peft_model

    base_dir = root / "base"
    adapters = {f"lora{i}": root / f"lora{i}" for i in range(ADAPTERS)}
    if all((p / "adapter_model.safetensors").exists() for p in adapters.values()):
        return base_dir, adapters
    model = tiny_mixtral(
        0,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_local_experts=EXPERTS,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=HIDDEN // 8,
        vocab_size=VOCAB,
    )
    save_model(model, base_dir, tiny_tokenizer(vocab_size=VOCAB), max_shard_size="4GB")
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    for i, path in enumerate(adapters.values()):
        peft_model = get_peft_model(copy.deepcopy(model), config)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(path)
    return base_dir, adapters


def decode_speed(rt: Runtime, names: list[str], tokens: int, rounds: int) -> float:
    """Generated tokens per second over `rounds` passes of one request per name, in order."""
    settings = GenerationSettings(max_new_tokens=tokens)
    prompt = rt.encode(names[0], PROMPT)
    complete(rt, names[0], prompt, settings)  # warm up
    done, start = 0, time.perf_counter()
    for _ in range(rounds):
        for name in names:
            done += len(complete(rt, name, prompt, settings).token_ids)
    return done / (time.perf_counter() - start)


def measure(rt: Runtime, names: list[str], tokens: int, rounds: int) -> dict:
    rb = rt.resident_bytes()
    return {
        "resident": rb.total,
        "host": rb.host,
        "adapters": rb.adapters,
        "one_adapter_tok_s": decode_speed(rt, [names[0]], tokens, rounds * len(names)),
        "round_robin_tok_s": decode_speed(rt, names, tokens, rounds),
        "swaps": len(rt.swaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="moeconsol-lora-serving-"))
    try:
        base, adapters = build(root)
        names = list(adapters)
        if not (root / "merged" / "manifest.json").exists():
            merge(open_checkpoints([f"base={base}", *(f"{n}={p}" for n, p in adapters.items())]), root / "merged")
            merge(open_checkpoints([f"base={base}"]), root / "base-only")
        results = {
            "merged": measure(Runtime.from_artifact(root / "merged"), names, args.tokens, args.rounds),
            "unmerged": measure(
                Runtime.from_artifact(root / "base-only", adapters=adapters), names, args.tokens, args.rounds
            ),
        }
        m, u = results["merged"], results["unmerged"]
        print(
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; base + {ADAPTERS} adapters r {RANK} on "
            f"q, k, v, o; {args.tokens} new tokens per request, greedy; load average {os.getloadavg()[0]:.1f}"
        )
        print()
        print("| | merged | unmerged | unmerged / merged |")
        print("|---|---|---|---|")
        for key, label, unit in (
            ("resident", "resident (bank + non-expert + adapters)", MiB),
            ("host", "host (variants' weights waiting to be swapped in)", MiB),
            ("one_adapter_tok_s", "decode, one adapter (tokens/s)", 1),
            ("round_robin_tok_s", f"decode, {ADAPTERS} adapters round-robin (tokens/s)", 1),
        ):
            a, b = m[key] / unit, u[key] / unit
            suffix = " MiB" if unit == MiB else ""
            ratio = f"{b / a:.2f}x" if a else "n/a"
            print(f"| {label} | {a:.1f}{suffix} | {b:.1f}{suffix} | {ratio} |")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
