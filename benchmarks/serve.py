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

    python benchmarks/serve.py [--device cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

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
    times = []
    report = None
    for _ in range(repeats):
        rt.activate(a)
        report = rt.activate(b)
        times.append(report.seconds)
    nbytes = report.bytes_moved
    pin = rt.device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=rt.device)
    threads = torch.get_num_threads()
    best = []
    for n in sorted({1, threads}):  # the bound: the faster of one thread and the default pool
        torch.set_num_threads(n)
        copies = []
        for _ in range(repeats):
            _sync(rt.device)
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            _sync(rt.device)
            copies.append(time.perf_counter() - t)
        best.append(statistics.median(copies))
    torch.set_num_threads(threads)
    swap, copy = statistics.median(times), min(best)
    return {"bytes": nbytes, "tensors_copied": report.tensors_copied, "tensors_skipped": report.tensors_skipped,
            "swap_s": swap, "plain_copy_s": copy, "ratio": swap / copy if copy else float("inf")}


def generation_speed(rt: Runtime, paths: dict[str, Path], name: str, tokens: int, repeats: int) -> dict:
    ref = transformers.MixtralForCausalLM.from_pretrained(paths[name], dtype=rt.dtype).to(rt.device).eval()
    ids = rt.encode(name, PROMPT)
    x = torch.tensor([ids], device=rt.device)
    settings = GenerationSettings(max_new_tokens=tokens)
    rt.complete(name, ids, settings)  # warm up both
    ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    ours, theirs = [], []
    for _ in range(repeats):
        c = rt.complete(name, ids, settings)
        ours.append(len(c.token_ids) / c.generation_seconds)
        _sync(rt.device)
        t = time.perf_counter()
        out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False)
        _sync(rt.device)
        theirs.append((out.shape[1] - len(ids)) / (time.perf_counter() - t))
        assert out[0, len(ids):].tolist() == c.token_ids, "runtime and transformers disagree"
    del ref
    return {"runtime_tokens_per_s": statistics.median(ours), "transformers_tokens_per_s": statistics.median(theirs), "tokens": tokens}


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
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = parse_device(args.device)
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
    if args.json:
        print(json.dumps(result, indent=1))
        return
    s, g = result["swap"], result["generation"]
    print(f"device {result['device']} ({result['dtype']}, {result['threads']} threads); resident {rb.total / 2**20:.1f} MiB "
          f"(bank {rb.bank / 2**20:.1f} MiB + non-expert {rb.non_expert / 2**20:.1f} MiB), banks {result['bank_sizes']}")
    print(f"swap base->code: {s['bytes'] / 2**20:.2f} MiB in {s['tensors_copied']} tensors ({s['tensors_skipped']} shared, skipped): "
          f"{s['swap_s'] * 1e3:.3f} ms; one plain copy of the same bytes {s['plain_copy_s'] * 1e3:.3f} ms (x{s['ratio']:.2f})")
    print(f"greedy {g['tokens']} tokens: runtime {g['runtime_tokens_per_s']:.1f} tok/s, transformers {g['transformers_tokens_per_s']:.1f} tok/s")
    for r in result["interleaved"]:
        w = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
        print(f"interleaved, max-wait {r['max_wait_s']} s: {r['swaps']} swaps / {r['requests']} requests; "
              f"TTFT from arrival with swap {w(r['ttft_with_swap_s'])}, without {w(r['ttft_without_swap_s'])}, worst {w(r['max_ttft_s'])}; "
              f"from dequeue with swap {w(r['service_ttft_with_swap_s'])}, without {w(r['service_ttft_without_swap_s'])}; "
              f"mean swap {w(r['swap_s_mean'])}")


if __name__ == "__main__":
    main()
