"""What a swap to a variant with expert corrections costs, against the same swap without them.

Builds a Mixtral family with moeconsol.testing (a base and three fine-tunes, each with its own
experts in every layer and every non-expert tensor changed), merges it twice with
`--mode calibrated` at the same budget, with `--deltas` (some slots served by a bank expert
plus a compressed correction) and without, and serves each artifact in swap mode. In the
same run, alternating within every repeat:

- the swap from the first variant to the one with the most corrected slots, on each artifact
  (the same non-expert bytes move in both);
- a plain copy of the corrected experts' bytes into a device buffer (one numpy memcpy on
  CPU, one copy from pinned memory on CUDA: the copy the runtime's swap issues).

Goal: swap with corrections <= 2 x the same swap without them + the plain copy.

    python benchmarks/swap_corrections.py [--size example|benchmark] [--device cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moeconsol.artifact.corrections import corrected
from moeconsol.artifact.reader import Artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.io.safetensors_file import ITEMSIZE
from moeconsol.serving.banks import canonical_experts
from moeconsol.serving.device import parse_device, synchronize
from moeconsol.serving.runtime import Runtime
from moeconsol.testing import SAMPLE_TEXT, derive_variant, save_model, tiny_mixtral, tiny_tokenizer

SIZES = {
    # the shapes of examples/build_family.py's demo family
    "example": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    ),
    # benchmarks/serve.py's
    "benchmark": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    ),
}
VARIANTS = {"code": (0, 1, 2, 3), "chat": (2, 3, 4, 5), "math": (4, 5, 6, 7)}
"""Each fine-tune's own experts, the same indices in every layer."""


def build(root: Path, size: dict, budget: str, delta_format: str | None) -> dict[str, Path]:
    """The family, merged calibrated at `budget` with and without corrections (of
    `delta_format`; None: the planner's choice) (reused when `root` holds them)."""
    out = {kind: root / kind for kind in ("with", "without")}
    if all((p / "manifest.json").is_file() for p in out.values()):
        return out
    tok = tiny_tokenizer()
    base = tiny_mixtral(0, **size)
    layers = size["num_hidden_layers"]
    models = {"base": base}
    for i, (name, experts) in enumerate(VARIANTS.items()):
        models[name] = derive_variant(base, i + 1, [(m, e) for m in range(layers) for e in experts], scale=0.05)
    refs = [f"{n}={save_model(m, root / n, tok)}" for n, m in models.items()]
    calibration = root / "calibration.txt"
    calibration.write_text(SAMPLE_TEXT * 20)
    for kind, deltas in (("with", True), ("without", False)):
        settings = MergeSettings(
            mode="calibrated",
            budget=budget,
            calibration={"*": str(calibration)},
            calibration_tokens=64,
            deltas=deltas,
            delta_format=delta_format if deltas else None,
        )
        merge(open_checkpoints(refs), out[kind], settings, force=True)
    return out


def corrected_slots(rt: Runtime, name: str) -> int:
    return sum(len(entries) for entries in rt.variant_set.variants[name].deltas.values())


def decoder(rt: Runtime, name: str):
    """What a swap to `name` would do if it rebuilt its corrected experts: for each, the bank
    entry plus its decoded delta (`corrections.corrected`, from components resident on the
    device, read here once) written into its private entry. The alternative to keeping them
    decoded, timed beside it."""
    record = rt.variant_set.record
    work = []
    for layer, entries in rt.variant_set.variants[name].deltas.items():
        module = rt._banks[layer]
        start = rt.variant_set.bank_sizes[layer]
        for j, x in enumerate(entries):
            comps = {
                p: {c: rt.variant_set.read(k).to(rt.device) for c, k in keys.items()} for p, keys in x.keys.items()
            }
            work.append((module, start + j, x, comps))

    @torch.no_grad()
    def rebuild() -> float:
        synchronize(rt.device)
        t = time.perf_counter()
        for module, k, x, comps in work:
            bank = canonical_experts(record, module)[x.bank]
            module.load_expert(k, {p: corrected(bank[p], comps[p], x.format, x.size) for p in bank})
        synchronize(rt.device)
        return time.perf_counter() - t

    return rebuild


def measure(paths: dict[str, Path], device: torch.device, repeats: int) -> dict:
    runtimes = {kind: Runtime.from_artifact(path, device=device) for kind, path in paths.items()}
    with_ = runtimes["with"]
    names = with_.names
    b = max(names[1:], key=lambda n: corrected_slots(with_, n))
    a = names[0]
    with_.activate(b)
    spec = Artifact.open(paths["with"]).spec
    expert_bytes = sum(math.prod(s) for s in spec.part_shapes.values()) * ITEMSIZE[spec.dtype]
    corrected = corrected_slots(with_, b) * expert_bytes
    pin = device.type == "cuda"
    sources = [torch.empty(corrected, dtype=torch.uint8, pin_memory=pin).fill_(k) for k in (1, 2)]
    dst = torch.empty(corrected, dtype=torch.uint8, device=device)

    def copy(src: torch.Tensor) -> None:
        if pin:
            dst.copy_(src, non_blocking=True)
        else:
            np.copyto(dst.numpy(), src.numpy())

    def plain_copy() -> float:
        copy(sources[0])
        synchronize(device)
        t = time.perf_counter()
        copy(sources[1])
        synchronize(device)
        return time.perf_counter() - t

    rebuild = decoder(with_, b)
    times: dict[str, list[float]] = {"with": [], "without": [], "copy": [], "rebuild": []}
    reports = {}
    for _ in range(repeats):
        for kind, rt in runtimes.items():
            rt.activate(a)
            reports[kind] = rt.activate(b)
            times[kind].append(reports[kind].seconds)
        times["copy"].append(plain_copy())
        with_.activate(b)
        times["rebuild"].append(rebuild())
    med = {k: statistics.median(v) for k, v in times.items()}
    bound = 2 * med["without"] + med["copy"]
    rb = with_.resident_bytes()
    return {
        "from": a,
        "to": b,
        "corrected_slots": corrected_slots(with_, b),
        "corrected_bytes": corrected,
        "non_expert_bytes": runtimes["without"].swap_bytes(a, b),
        "bytes_moved": {k: r.bytes_moved for k, r in reports.items()},
        "swap_with_s": med["with"],
        "swap_without_s": med["without"],
        "plain_copy_s": med["copy"],
        "rebuild_corrections_s": med["rebuild"],
        "bound_s": bound,
        "ratio_to_bound": med["with"] / bound,
        "resident_bytes": rb.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="benchmark")
    ap.add_argument("--budget", default="0.45", help="merge budget, a fraction of the expert bytes")
    ap.add_argument(
        "--delta-format",
        default=None,
        help="one correction format (int4 and sign merge fastest: no SVD); default: the planner's choice",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--keep", type=Path, help="build the family and its artifacts here once and reuse them")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(args.keep or Path(tmp), SIZES[args.size], args.budget, args.delta_format)
        r = measure(paths, device, args.repeats)
    r.update(
        size=args.size,
        delta_format=args.delta_format or "auto",
        device=str(device),
        threads=torch.get_num_threads(),
        load_average=[load, os.getloadavg()[0]],
    )
    if args.json:
        print(json.dumps(r, indent=1))
        return
    kib = lambda n: f"{n / 1024:.0f} KiB"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.3f} ms"  # noqa: E731
    print(
        f"{args.size} family ({r['delta_format']} corrections) on {r['device']} ({r['threads']} threads), load {load:.1f} -> {os.getloadavg()[0]:.1f}: "
        f"swap {r['from']} -> {r['to']}, {kib(r['non_expert_bytes'])} of non-expert tensors, "
        f"{r['corrected_slots']} corrected experts ({kib(r['corrected_bytes'])})"
    )
    print(
        f"  with corrections {ms(r['swap_with_s'])}; without {ms(r['swap_without_s'])}; plain copy of the corrected "
        f"experts {ms(r['plain_copy_s'])}; bound 2 x without + copy {ms(r['bound_s'])}: x{r['ratio_to_bound']:.2f}"
    )
    print(f"  rebuilding the corrected experts from their components instead: {ms(r['rebuild_corrections_s'])}")
    rb = r["resident_bytes"]
    print(
        f"  resident {kib(rb['total'])} (bank {kib(rb['bank'])}); host {kib(rb['host'])}"
        + (f", corrected experts {kib(rb['corrected'])}" if "corrected" in rb else "")
    )


if __name__ == "__main__":
    main()
