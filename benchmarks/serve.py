"""Benchmark the runtime: swap cost, generation speed, interleaved requests.

Builds a small-but-not-trivial Mixtral family with moeconsol.testing (base + two
fine-tunes with some experts changed), merges it losslessly with the library, and measures:

1. swap time vs. the bound of copying the same bytes with one plain tensor copy
   (host -> device buffer, pinned on CUDA), measured in the same run;
2. tokens per second of the runtime vs. transformers' own model loaded from the original
   checkpoint, same prompt, same greedy settings;
3. interleaved requests for two variants through the server's scheduler: swaps per
   request and time to first token with and without a swap, for active-first scheduling
   (`--max-wait` large) and plain FIFO (`max_wait` 0).

With `--wide`, also a Mixtral-shaped model of realistic width (hidden 1024, experts
1024 x 3584, 6 layers x 8 experts, vocab 32000, bf16, 1.2 GB per checkpoint; base + a
fine-tune with 2 experts per layer and every non-expert tensor changed, merged losslessly):
its swap cost and its tokens/s next to transformers' own model (`--keep DIR` keeps and reuses
the checkpoints and artifact between runs).

    python benchmarks/serve.py [--device cuda] [--wide [--keep DIR]] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from moeconsol.checkpoint import open_checkpoints
from moeconsol.merge import merge
from moeconsol.runtime import GenerationSettings, Runtime, parse_device
from moeconsol.server import Job, Scheduler
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer

PROMPT = "Once upon a time there was a model that served many fine-tunes"
SIZE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


WIDE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)


def build_wide(root: Path) -> dict[str, Path]:
    """base + ft of the realistic-width shape, bf16, merged losslessly (reused if `root` has them)."""
    paths = {"base": root / "base", "ft": root / "ft", "out": root / "out"}
    if (paths["out"] / "manifest.json").is_file():
        return paths
    tok = tiny_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        base = tiny_mixtral(0, **WIDE)
    finally:
        torch.set_default_dtype(previous)
    save_model(base, paths["base"], tok)
    ft = derive_variant(base, 1, changed_experts=[(i, e) for i in range(WIDE["num_hidden_layers"]) for e in (2, 5)])
    del base
    save_model(ft, paths["ft"], tok)
    del ft
    merge(open_checkpoints([f"{n}={paths[n]}" for n in ("base", "ft")]), paths["out"])
    return paths


def build(root: Path) -> dict[str, Path]:
    tok = tiny_tokenizer()
    base = tiny_mixtral(0, **SIZE)
    models = {
        "base": base,
        "code": derive_variant(base, 1, changed_experts=[(i, e) for i in range(4) for e in (0, 3)]),
        "chat": derive_variant(base, 2, changed_experts=[(i, e) for i in range(4) for e in (1, 5, 6)]),
    }
    paths = {n: save_model(m, root / n, tok) for n, m in models.items()}
    merge(open_checkpoints([f"{n}={p}" for n, p in paths.items()]), root / "out")
    return {**paths, "out": root / "out"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def swap_cost(rt: Runtime, a: str, b: str, repeats: int) -> dict:
    """Median swap a -> b next to the fastest plain copy of the same bytes into a device buffer,
    in the same pattern: each repeat first copies from one source (untimed, as activate(a)),
    then times the copy from another (as activate(b)). The swap and the single-threaded plain
    copies alternate within each repeat, so a change of the machine's load hits all of them:
    on CUDA one copy from pinned memory; on CPU one numpy memcpy (what the runtime's CPU swap
    uses) and torch's copy with one thread. torch's CPU copy with its default thread pool is
    measured after the loop: its idle threads keep spinning for a while after each parallel
    region, which would slow whatever is measured next on a 2-core machine."""
    nbytes = rt.swap_bytes(a, b)
    pin = rt.device.type == "cuda"
    sources = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(k) for k in (1, 2)]
    dst = torch.empty(nbytes, dtype=torch.uint8, device=rt.device)
    threads = torch.get_num_threads()

    def torch_copy(src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def one_thread_copy(src: torch.Tensor) -> None:  # the benchmark's own bound; the runtime never changes threads
        torch.set_num_threads(1)
        try:
            dst.copy_(src)
        finally:
            torch.set_num_threads(threads)

    def memcpy(src: torch.Tensor) -> None:
        np.copyto(dst.numpy(), src.numpy())

    def timed(copy) -> float:
        copy(sources[0])
        _sync(rt.device)
        t = time.perf_counter()
        copy(sources[1])
        _sync(rt.device)
        return time.perf_counter() - t

    copies = {"torch": torch_copy} if pin else {"memcpy": memcpy, "torch_1_thread": one_thread_copy}
    times: dict[str, list[float]] = {"swap": [], **{k: [] for k in copies}}
    report = None
    for _ in range(repeats):
        rt.activate(a)
        report = rt.activate(b)
        times["swap"].append(report.seconds)
        for kind, copy in copies.items():
            times[kind].append(timed(copy))
    if not pin:
        times["torch"] = [timed(torch_copy) for _ in range(repeats)]
    assert report.bytes_moved == nbytes
    medians = {k: statistics.median(v) for k, v in times.items()}
    swap = medians.pop("swap")
    bound = min(medians.values())
    same = medians["torch" if pin else "memcpy"]  # the plain copy the swap itself issues
    return {"bytes": nbytes, "tensors_copied": report.tensors_copied, "tensors_skipped": report.tensors_skipped,
            "swap_s": swap, "plain_copy_s": bound, "plain_copies_s": medians, "ratio": swap / bound,
            "ratio_to_same_copy": swap / same}


def generation_speed(rt: Runtime, paths: dict[str, Path], name: str, tokens: int, repeats: int) -> dict:
    """Greedy tokens/s of the runtime's model and of transformers' own model loaded from the
    original checkpoint: the same `generate` call on both, alternated, same tokens checked.
    Wall time, and the process's CPU time (less sensitive to other jobs on a shared machine)."""
    ref = transformers.MixtralForCausalLM.from_pretrained(paths[name], dtype=rt.dtype).to(rt.device).eval()
    ids = rt.tokenizer(name)(PROMPT)["input_ids"]
    x = torch.tensor([ids], device=rt.device)
    rt.activate(name)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    def timed(model) -> tuple[float, float, list[int]]:
        _sync(rt.device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = model.generate(**kw)
        _sync(rt.device)
        return time.perf_counter() - wall, time.process_time() - cpu, out[0, len(ids):].tolist()

    timed(rt.model), timed(ref)  # warm up both
    runs: dict[str, list[tuple[float, float]]] = {"runtime": [], "transformers": []}
    for _ in range(repeats):
        (wall_a, cpu_a, got), (wall_b, cpu_b, want) = timed(rt.model), timed(ref)
        assert got == want, "runtime and transformers disagree"
        runs["runtime"].append((wall_a, cpu_a))
        runs["transformers"].append((wall_b, cpu_b))
    del ref
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    best = {k: min(w for w, _ in v) for k, v in runs.items()}  # the run least disturbed by other jobs
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    return {"runtime_tokens_per_s": tokens / wall["runtime"], "transformers_tokens_per_s": tokens / wall["transformers"],
            "ratio": wall["transformers"] / wall["runtime"], "best_ratio": best["transformers"] / best["runtime"],
            "cpu_ratio": cpu["transformers"] / cpu["runtime"], "tokens": tokens,
            "seconds": {k: [round(w, 4) for w, _ in v] for k, v in runs.items()}}


def interleaved(rt: Runtime, models: list[str], requests: int, max_wait: float, tokens: int) -> dict:
    rt.activate(models[0])
    ids = {m: rt.encode(m, PROMPT) for m in models}
    scheduler = Scheduler(rt, max_wait=max_wait)
    order = [models[(i + 1) % 2] for i in range(requests)]  # starts with the inactive model
    futures = []
    scheduler.start()
    try:
        for m in order:  # arrivals spaced at a fraction of a request's service time
            futures.append(scheduler.submit(Job(m, ids[m], GenerationSettings(tokens))))
            time.sleep(0.01)
        results = [f.result(timeout=600) for f in futures]
    finally:
        scheduler.stop()
    swapped = [r.time_to_first_token for r in results if r.swap.previous != r.model]
    kept = [r.time_to_first_token for r in results if r.swap.previous == r.model]
    served_swapped = [r.time_to_first_token - r.queued_seconds for r in results if r.swap.previous != r.model]
    served_kept = [r.time_to_first_token - r.queued_seconds for r in results if r.swap.previous == r.model]
    return {
        "max_wait_s": max_wait, "requests": requests, "swaps": len(swapped), "swaps_per_request": len(swapped) / requests,
        "ttft_with_swap_s": statistics.mean(swapped) if swapped else None,
        "ttft_without_swap_s": statistics.mean(kept) if kept else None,
        "service_ttft_with_swap_s": statistics.mean(served_swapped) if served_swapped else None,
        "service_ttft_without_swap_s": statistics.mean(served_kept) if served_kept else None,
        "swap_s_mean": statistics.mean(r.swap.seconds for r in results if r.swap.previous != r.model) if swapped else None,
        "max_ttft_s": max(r.time_to_first_token for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--wide", action="store_true", help="also the realistic-width bf16 family (1.2 GB checkpoints)")
    ap.add_argument("--keep", type=Path, help="with --wide: build the wide family here once and reuse it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = parse_device(args.device)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        rt = Runtime.from_artifact(paths["out"], device=device)
        rb = rt.resident_bytes()
        result = {
            "device": str(device), "dtype": str(rt.dtype), "threads": torch.get_num_threads(),
            "model": SIZE, "bank_sizes": rt.family.bank_sizes, "resident_bytes": rb.to_dict(),
            "swap": swap_cost(rt, "base", "code", args.repeats),
            "generation": generation_speed(rt, paths, "code", args.tokens, args.repeats),
            "interleaved": [interleaved(rt, ["base", "code"], args.requests, w, 8) for w in (30.0, 0.0)],
        }
        del rt
        if args.wide:
            wide = build_wide(args.keep or Path(tmp) / "wide")
            rt = Runtime.from_artifact(wide["out"], device=device)
            result["wide"] = {
                "model": WIDE, "dtype": str(rt.dtype), "resident_bytes": rt.resident_bytes().to_dict(),
                "swap": swap_cost(rt, "base", "ft", args.repeats),
                "generation": generation_speed(rt, wide, "ft", args.tokens, args.repeats),
            }
            del rt
    result["load_average"] = [load, os.getloadavg()[0]]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"device {result['device']} ({result['dtype']}, {result['threads']} threads); load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"tiny: resident {rb.total / 2**20:.1f} MiB (bank {rb.bank / 2**20:.1f} MiB + non-expert {rb.non_expert / 2**20:.1f} MiB), "
          f"banks {result['bank_sizes']}")
    _print_swap_and_speed("tiny", "base->code", result)
    if "wide" in result:
        wb = result["wide"]["resident_bytes"]
        print(f"wide ({result['wide']['dtype']}): resident {wb['total'] / 2**20:.1f} MiB (bank {wb['bank'] / 2**20:.1f} MiB "
              f"+ non-expert {wb['non_expert'] / 2**20:.1f} MiB)")
        _print_swap_and_speed("wide", "base->ft", result["wide"])
    for r in result["interleaved"]:
        w = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
        print(f"interleaved, max-wait {r['max_wait_s']} s: {r['swaps']} swaps / {r['requests']} requests; "
              f"TTFT from arrival with swap {w(r['ttft_with_swap_s'])}, without {w(r['ttft_without_swap_s'])}, worst {w(r['max_ttft_s'])}; "
              f"from dequeue with swap {w(r['service_ttft_with_swap_s'])}, without {w(r['service_ttft_without_swap_s'])}; "
              f"mean swap {w(r['swap_s_mean'])}")


def _print_swap_and_speed(label: str, pair: str, result: dict) -> None:
    s, g = result["swap"], result["generation"]
    print(f"{label} swap {pair}: {s['bytes'] / 2**20:.2f} MiB, {s['tensors_copied']} tensors in one copy per dtype "
          f"({s['tensors_skipped']} shared, not copied): {s['swap_s'] * 1e3:.3f} ms; "
          f"the fastest plain copy of the same bytes {s['plain_copy_s'] * 1e3:.3f} ms (x{s['ratio']:.2f}; "
          f"x{s['ratio_to_same_copy']:.2f} the same kind of copy; each kind: "
          + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in s["plain_copies_s"].items()) + ")")
    print(f"{label} greedy {g['tokens']} tokens: runtime {g['runtime_tokens_per_s']:.2f} tok/s, "
          f"transformers {g['transformers_tokens_per_s']:.2f} tok/s (x{g['ratio']:.3f} by medians; "
          f"x{g['best_ratio']:.3f} by best runs; x{g['cpu_ratio']:.3f} by CPU time)")


if __name__ == "__main__":
    main()
