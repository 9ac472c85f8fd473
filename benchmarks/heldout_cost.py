"""Time of calibrated mode's held-back check beside the merge's, at realistic width, and what
that makes at Mixtral-8x7B size.

    python benchmarks/heldout_cost.py [--layers 2] [--keep DIR] [--budget 0.5]
        [--calibration-tokens 64] [--text-tokens 5120] [--json FILE]

Builds `benchmarks/merge.py`'s four Mixtral-shaped checkpoints (real Mixtral proportions:
hidden 1024, intermediate 3584, 8 experts, top-2, vocab 32000, bf16; experts 0-3 of every
layer bit-identical in all four, 4-7 the base's plus noise) with a tokenizer saved beside
each, and one calibration text of about `--text-tokens` tokens (its held-back 20% is what the
check scores, up to its cap of 4096 tokens per variant; the planning part is what capture
runs, up to its cap of 16384). Then, in this process, on page-cached inputs:

- `merge --mode calibrated --budget B` (the check on, `--holdout 0.2`, the default);
- the bound: the same merge with `--holdout 0` (unchecked, planning on all of the text).

It prints the merge's seconds, the check's, and the check's parts, timed around the library's
own calls: model loads, forward passes over held-back tokens (how many, of how many tokens),
and writing what each candidate serves into the loaded model (the expert bytes it reads).

Each part is then scaled to Mixtral-8x7B (32 layers, hidden 4096, intermediate 14336:
46.7 B parameters, 12.9 B active per token, experts 45.1 B, bf16) by the quantity it is
linear in, at the same token counts: loads by the model's bytes, forwards by the parameters
active per token, serving by the expert bytes. That is an extrapolation for a machine like
this one (CPU, memory-resident checkpoints), not a measurement at that size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import merge as merge_bench  # noqa: E402  (the family of benchmarks/merge.py)

MIXTRAL_8X7B = {"params": 46.7e9, "active": 12.9e9, "experts": 45.1e9, "bytes_per_param": 2}


def model_sizes(layers: int) -> dict[str, float]:
    """Parameters of the benchmark's model: all, active per token (2 of 8 experts), experts."""
    h, i, e, v = merge_bench.HIDDEN, merge_bench.INTERMEDIATE, merge_bench.EXPERTS, merge_bench.VOCAB
    kv = 256  # k_proj / v_proj rows (benchmarks/merge.py)
    attn = h * h * 2 + kv * h * 2
    expert = 3 * h * i
    per_layer = attn + e * expert + e * h + 2 * h
    return {
        "params": layers * per_layer + 2 * v * h + h,
        # the forward's matrices: attention, 2 experts, the router per layer; the output head
        "active": layers * (attn + 2 * expert + e * h) + v * h,
        "experts": layers * e * expert,
    }


def calibration_text(tokens: int, tok) -> str:
    """A text of about `tokens` tokens of `tok` (numbered lines, so that no two are alike)."""
    from moeconsol.testing import SAMPLE_TEXT

    lines, n, k = [], 0, 0
    while n < tokens:
        line = f"{k}: {SAMPLE_TEXT}"
        lines.append(line)
        n += len(tok(line + "\n")["input_ids"])
        k += 1
    return "\n".join(lines)


class Timer:
    """Wall-clock seconds and calls of wrapped functions, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(owner, attr, timed)


def run(root: Path, layers: int, budget: str, calibration_tokens: int, text_tokens: int) -> dict:
    from moeconsol.consolidate import MergeSettings, checking, merge
    from moeconsol.consolidate.served import ServedVariant
    from moeconsol.io.checkpoint import open_checkpoints
    from moeconsol.testing import tiny_tokenizer

    dirs = sorted(root.glob("model*"))
    if not dirs:
        dirs = merge_bench.build_family(root, layers, shared=4)
    tok = tiny_tokenizer()
    for d in dirs:
        tok.save_pretrained(d)
    cal = root / "calibration.txt"
    cal.write_text(calibration_text(text_tokens, tok))
    for d in dirs:  # page-cache the inputs, as benchmarks/merge.py does
        for f in d.glob("*.safetensors"):
            f.read_bytes()

    timer = Timer()
    timer.wrap(checking, "load_model", "load")
    timer.wrap(checking, "heldout_loss", "forward")
    timer.wrap(ServedVariant, "serve", "serve")
    models = [f"m{k}={d}" for k, d in enumerate(dirs)]
    out: dict = {"layers": layers, "budget": budget, "calibration_tokens": calibration_tokens}
    out["text_tokens"] = len(tok(cal.read_text())["input_ids"])
    for name, holdout in (("checked", None), ("unchecked", 0.0)):
        s = MergeSettings(
            mode="calibrated",
            budget=budget,
            calibration={"*": str(cal)},
            calibration_tokens=calibration_tokens,
            holdout=holdout,
        )
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            t0 = time.perf_counter()
            r = merge(open_checkpoints(models), Path(tmp) / "out", s)
            wall = time.perf_counter() - t0
        h = r.manifest.get("heldout")
        out[name] = {
            "seconds": r.seconds,
            "wall": wall,
            "check_seconds": r.check_seconds,
            "chosen": None if h is None else h["chosen"],
            "tokens": None if h is None else {n: v["tokens"] for n, v in h["variants"].items()},
        }
        if name == "checked":
            out["parts"] = {
                k: {"seconds": timer.seconds.get(k, 0.0), "calls": timer.calls.get(k, 0)}
                for k in ("load", "forward", "serve")
            }
    out["model_bytes"] = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
    return out


def extrapolate(result: dict) -> dict:
    """The check's parts scaled to Mixtral-8x7B (module docstring)."""
    size = model_sizes(result["layers"])
    big = MIXTRAL_8X7B
    factors = {
        "load": big["params"] * big["bytes_per_param"] / result["model_bytes"],
        "forward": big["active"] / size["active"],
        "serve": big["experts"] / size["experts"],
    }
    parts = result["parts"]
    scaled = {k: parts[k]["seconds"] * f for k, f in factors.items()}
    return {"factors": factors, "seconds": scaled, "check": sum(scaled.values())}


def report(result: dict, big: dict) -> list[str]:
    c, u, parts = result["checked"], result["unchecked"], result["parts"]
    other = c["check_seconds"] - sum(p["seconds"] for p in parts.values())
    lines = [
        f"4 variants x {result['layers']} layers x 8 experts, hidden 1024, bf16, "
        f"{result['model_bytes'] / 1e9:.2f} GB each; budget {result['budget']}, "
        f"calibration tokens {result['calibration_tokens']}, text {result['text_tokens']} tokens; "
        f"written: {c['chosen']}",
        "",
        "| run | seconds | / unchecked merge |",
        "|---|---|---|",
        f"| merge, unchecked (`--holdout 0`, the bound) | {u['seconds']:.1f} | 1.00x |",
        f"| merge, checked (default) | {c['seconds']:.1f} | {c['seconds'] / u['seconds']:.2f}x |",
        f"| of which the held-back check | {c['check_seconds']:.1f} | {c['check_seconds'] / u['seconds']:.2f}x "
        f"({c['check_seconds'] / c['seconds']:.0%} of the checked merge) |",
        "",
        "| check part | calls | seconds | scaled to Mixtral-8x7B by | factor | seconds there |",
        "|---|---|---|---|---|---|",
    ]
    by = {"load": "model bytes", "forward": "active parameters per token", "serve": "expert bytes"}
    for k in ("load", "forward", "serve"):
        lines.append(
            f"| {k} | {parts[k]['calls']} | {parts[k]['seconds']:.1f} | {by[k]} | {big['factors'][k]:.0f}x "
            f"| {big['seconds'][k]:.0f} |"
        )
    lines.append(f"| other (candidates, choice) | | {other:.1f} | | | |")
    lines.append(f"| **check** | | {c['check_seconds']:.1f} | | | **{big['check']:.0f}** |")
    tokens = sorted(set((c["tokens"] or {}).values()))
    lines.append("")
    lines.append(f"held-back tokens scored per variant: {', '.join(map(str, tokens))}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget", default="0.5")
    parser.add_argument("--calibration-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=5120, help="calibration text size, in tokens")
    parser.add_argument("--keep", type=Path, help="build the family here and keep it (reused when present)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.keep, args.layers, args.budget, args.calibration_tokens, args.text_tokens)
    else:
        with tempfile.TemporaryDirectory(prefix="moeconsol-heldout-cost-") as tmp:
            result = run(Path(tmp), args.layers, args.budget, args.calibration_tokens, args.text_tokens)
    big = extrapolate(result)
    result["mixtral_8x7b"] = big
    print("\n".join(report(result, big)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
