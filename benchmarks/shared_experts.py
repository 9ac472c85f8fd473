"""Shared (always-on) experts: how big they are next to the routed experts and the rest of the
non-expert tensors, at the real sizes of Qwen2-MoE (transformers' default Qwen2MoeConfig =
Qwen1.5-MoE-A2.7B) and DeepSeek-V2/V3 (their default configs), counted on transformers' own
models built on the meta device (no memory). Run: python benchmarks/shared_experts.py

This is what docs/architecture.md's decision rests on: shared experts are kept with the
non-expert tensors (stored once when bit-identical across variants, swapped otherwise).
"""

from __future__ import annotations

import torch
import transformers

from moeconsol.architectures.layouts import architecture

FAMILIES = {"qwen2_moe": "Qwen1.5-MoE-A2.7B", "deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3"}


def count(name: str) -> dict[str, int]:
    record = architecture(name)
    config = getattr(transformers, record.config_class)()
    with torch.device("meta"):
        model = getattr(transformers, record.model_class)(config)
    out = {"routed": 0, "shared": 0, "rest": 0}
    for pname, p in model.state_dict().items():
        kind = (
            "routed" if ".mlp.experts." in pname else "shared" if f".mlp.{record.shared_experts}" in pname else "rest"
        )
        out[kind] += p.numel()
    return out


def main() -> None:
    print("| family (config) | routed experts | shared experts | other non-expert | shared / (shared + other) |")
    print("|---|---|---|---|---|")
    for name, label in FAMILIES.items():
        c = count(name)
        b = lambda n: f"{n / 1e9:.2f} B"  # noqa: E731
        print(
            f"| {label} | {b(c['routed'])} | {b(c['shared'])} | {b(c['rest'])} | {c['shared'] / (c['shared'] + c['rest']):.0%} |"
        )


if __name__ == "__main__":
    main()
