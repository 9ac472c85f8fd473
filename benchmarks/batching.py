"""How often a batched greedy answer differs from the same prompt's answer alone.

On the example family (`python examples/build_family.py --out FAMILY`): each architecture's
variants are merged losslessly into a temporary artifact and served by one `Runtime`. For
every variant, held-out prompts of its family's eval data (documents cut at a random length;
Switch: task inputs) are generated greedily twice: alone (a batch of one) and through one
`Engine` the way the server runs them (groups prefilled together, joining a running batch every
few steps, up to `--batch` rows). Differences can only come from last-bit rounding of batched
kernels (other shapes, padded positions); the script counts the answers that differ and the
first token where they do.

    python benchmarks/batching.py --family FAMILY [--arch mixtral|switch] [--prompts 64] [--tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from moeconsol.consolidate.pipeline import merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.engine import Engine, GenerationSettings, Request, complete
from moeconsol.serving.runtime import Runtime


def prompts_for(
    family: Path, arch: str, variant: str, n: int, rt: Runtime, tokens: int, rng: random.Random
) -> list[list[int]]:
    eval_dir = family / "data" / "eval"
    if arch == "mixtral":
        files = sorted(eval_dir.glob("mixtral-*.txt"))
        docs = [d.strip() for f in files for d in f.read_text().split("\n\n") if d.strip()]
    else:
        docs = [
            json.loads(line)["input"]
            for f in sorted(eval_dir.glob("switch-*.jsonl"))
            for line in f.read_text().splitlines()
        ]
    context = rt.max_context(variant)
    out = []
    for doc in rng.sample(docs, min(n, len(docs))):
        ids = rt.encode(variant, doc)
        limit = len(ids) if context is None else min(len(ids), context - tokens)
        if arch == "mixtral":
            ids = ids[: rng.randint(4, max(4, limit))]
        out.append(ids[:limit])
    return out


def batched(
    rt: Runtime, variant: str, prompts: list[list[int]], tokens: int, batch: int, group: int
) -> list[list[int]]:
    """The server's way: `group` requests prefilled together join the running batch every 3 steps."""
    engine = Engine(rt, max_batch_size=batch)
    requests = [Request(variant, p, GenerationSettings(max_new_tokens=tokens)) for p in prompts]
    waiting, steps = list(requests), 0
    while waiting or engine.running():
        if waiting and steps % 3 == 0:
            take = min(group, engine.free_slots(), len(waiting))
            engine.admit_all([waiting.pop(0) for _ in range(take)])
        engine.step()
        steps += 1
    return [r.token_ids for r in requests]


def measure(family: Path, arch: str, n: int, tokens: int, batch: int, seed: int) -> dict:
    models = sorted(p.parent for p in (family / arch).glob("*/config.json"))
    with tempfile.TemporaryDirectory() as tmp:
        merge(open_checkpoints([f"{m.name}={m}" for m in models]), Path(tmp) / "out")
        rt = Runtime.from_artifact(Path(tmp) / "out")
        rows = []
        for variant in rt.names:
            rt.activate(variant)
            prompts = prompts_for(family, arch, variant, n, rt, tokens, random.Random(seed))
            alone = [complete(rt, variant, p, GenerationSettings(max_new_tokens=tokens)).token_ids for p in prompts]
            together = batched(rt, variant, prompts, tokens, batch, group=4)
            firsts = [
                next(i for i, (a, b) in enumerate(zip(x + [-1], y + [-2])) if a != b)
                for x, y in zip(alone, together)
                if x != y
            ]
            rows.append(
                {
                    "variant": variant,
                    "prompts": len(prompts),
                    "tokens": sum(map(len, alone)),
                    "answers_differing": len(firsts),
                    "first_difference_at": firsts,
                }
            )
    return {"architecture": arch, "max_new_tokens": tokens, "batch": batch, "variants": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", action="append", choices=["mixtral", "switch"], help="default: every one the family has")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [
        measure(args.family, arch, args.prompts, args.tokens, args.batch, args.seed)
        for arch in args.arch or ["mixtral", "switch"]
        if (args.family / arch).is_dir()
    ]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for res in results:
        for row in res["variants"]:
            print(
                f"{res['architecture']}/{row['variant']}: {row['answers_differing']} of {row['prompts']} batched greedy answers "
                f"differ from alone ({row['tokens']} tokens alone, up to {res['max_new_tokens']} each, batch {res['batch']})"
                + (f"; first difference at token {row['first_difference_at']}" if row["first_difference_at"] else "")
            )


if __name__ == "__main__":
    main()
