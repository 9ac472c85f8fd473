"""A tiny family of any architecture moeconsol knows: a base and two variants, written by
transformers' own save_pretrained (variant `b` in the fused layout where the family has one).

    python examples/build_tiny_family.py qwen3_moe examples/family/qwen3_moe

The weights are random (transformers' initialisation) and each variant changes a few experts
and every non-expert tensor (`moeconsol.testing.derive_variant`): enough to show the pipeline
on a modern family, not trained models (examples/build_family.py trains Mixtral and Switch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeconsol.architectures.layouts import ARCHITECTURES, architecture
from moeconsol.testing import derive_variant, save_model, tiny_model, tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=[a.name for a in ARCHITECTURES])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    tok = tiny_tokenizer()
    base = tiny_model(args.architecture, seed=0)
    fused = len(architecture(args.architecture).layouts) > 1
    save_model(base, args.out / "base", tok)
    save_model(derive_variant(base, 1, [(0, 1), (1, 2)], scale=0.05), args.out / "a", tok)
    save_model(derive_variant(base, 2, [(0, 3)], scale=0.05), args.out / "b", tok, fused=fused)
    print(f"wrote {args.out}/base, a, b ({args.architecture})")


if __name__ == "__main__":
    main()
