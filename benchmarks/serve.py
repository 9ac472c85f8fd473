"""Benchmark the runtime: swap cost, generation speed, interleaved requests.

Builds a small-but-not-trivial Mixtral family with moeconsol.testing (base + two
fine-tunes with some experts changed), merges it losslessly with the library, and measures:

1. swap time vs. the bound of copying the same bytes with one plain tensor copy
   (host -> device buffer, pinned on CUDA), measured in the same run;
2. tokens per second of the runtime vs. transformers' own model loaded from the original
   checkpoint, same prompt, same greedy settings;
3. interleaved requests for two variants through the server's scheduler: swaps per
   request and time to first token with and without a swap, for active-first scheduling
   (`--max-wait` large) and plain FIFO (`max_wait` 0);
4. concurrency: the same greedy requests over two variants sent to the HTTP server (uvicorn
   on loopback, in this process) by 1, 2, 4, 8, 16 concurrent clients; throughput (generated
   tokens / wall time) next to one-at-a-time decoding (`engine.complete`, one request after
   another) run just before each (the median ratio of 3 pairs), and each answer checked
   against the one-at-a-time one; in swap mode (one variant per step) and with
   `--cross-variant-batching` (one step for all variants; `--modes`);
5. the engine alone (no HTTP), B requests decoded together: one variant's batch in swap mode
   vs. a batch of two variants alternating row by row in cross-variant mode (what grouping
   rows by variant costs per step).

With `--wide`, also a Mixtral-shaped model of realistic width (hidden 1024, experts
1024 x 3584, 6 layers x 8 experts, vocab 32000, bf16, 1.2 GB per checkpoint; base + a
fine-tune with 2 experts per layer and every non-expert tensor changed, merged losslessly):
its swap cost and its tokens/s next to transformers' own model (`--keep DIR` keeps and reuses
the checkpoints and artifact between runs).

    python benchmarks/serve.py [--device cuda] [--wide [--keep DIR]] [--json] [--only concurrency]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers

from moeconsol.consolidate.pipeline import merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.crossvariant import ServingMode
from moeconsol.serving.device import parse_device
from moeconsol.serving.engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_WAIT,
    Engine,
    GenerationSettings,
    Request,
    complete,
)
from moeconsol.serving.runtime import Runtime
from moeconsol.serving.scheduler import Job, Scheduler
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer

PROMPT = "Once upon a time there was a model that served many fine-tunes"
SHORT_PROMPT = "Once upon a time"  # 12 tokens with a number: + 32 new tokens fit the example family's context of 64
SIZE = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)
# The shapes of examples/build_family.py's demo family (FULL), with random weights: the goal of
# 16 concurrent requests >= 4x one-at-a-time on CPU is stated for these tiny models.
EXAMPLE_SIZE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)


WIDE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
)


def build_wide(root: Path) -> dict[str, Path]:
    """base + ft of the realistic-width shape, bf16, merged losslessly (reused if `root` has them)."""
    paths = {"base": root / "base", "ft": root / "ft", "out": root / "out"}
    if (paths["out"] / "manifest.json").is_file():
        return paths
    tok = tiny_tokenizer()
    base = tiny_mixtral(0, dtype=torch.bfloat16, **WIDE)
    save_model(base, paths["base"], tok)
    ft = derive_variant(base, 1, changed_experts=[(i, e) for i in range(WIDE["num_hidden_layers"]) for e in (2, 5)])
    del base
    save_model(ft, paths["ft"], tok)
    del ft
    merge(open_checkpoints([f"{n}={paths[n]}" for n in ("base", "ft")]), paths["out"])
    return paths


def build(root: Path, size: dict = SIZE) -> dict[str, Path]:
    tok = tiny_tokenizer()
    base = tiny_mixtral(0, **size)
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
    return {
        "bytes": nbytes,
        "tensors_copied": report.tensors_copied,
        "tensors_skipped": report.tensors_skipped,
        "swap_s": swap,
        "plain_copy_s": bound,
        "plain_copies_s": medians,
        "ratio": swap / bound,
        "ratio_to_same_copy": swap / same,
    }


def generation_speed(rt: Runtime, paths: dict[str, Path], name: str, tokens: int, repeats: int) -> dict:
    """Greedy tokens/s of the runtime's model and of transformers' own model loaded from the
    original checkpoint: the same `generate` call on both, alternated, same tokens checked.
    Wall time, and the process's CPU time (less sensitive to other jobs on a shared machine)."""
    ref = transformers.MixtralForCausalLM.from_pretrained(paths[name], dtype=rt.dtype).to(rt.device).eval()
    ids = rt.tokenizer(name)(PROMPT)["input_ids"]
    x = torch.tensor([ids], device=rt.device)
    rt.activate(name)
    kw = dict(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
    )

    def timed(model) -> tuple[float, float, list[int]]:
        _sync(rt.device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = model.generate(**kw)
        _sync(rt.device)
        return time.perf_counter() - wall, time.process_time() - cpu, out[0, len(ids) :].tolist()

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
    return {
        "runtime_tokens_per_s": tokens / wall["runtime"],
        "transformers_tokens_per_s": tokens / wall["transformers"],
        "ratio": wall["transformers"] / wall["runtime"],
        "best_ratio": best["transformers"] / best["runtime"],
        "cpu_ratio": cpu["transformers"] / cpu["runtime"],
        "tokens": tokens,
        "seconds": {k: [round(w, 4) for w, _ in v] for k, v in runs.items()},
    }


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
        "max_wait_s": max_wait,
        "requests": requests,
        "swaps": len(swapped),
        "swaps_per_request": len(swapped) / requests,
        "ttft_with_swap_s": statistics.mean(swapped) if swapped else None,
        "ttft_without_swap_s": statistics.mean(kept) if kept else None,
        "service_ttft_with_swap_s": statistics.mean(served_swapped) if served_swapped else None,
        "service_ttft_without_swap_s": statistics.mean(served_kept) if served_kept else None,
        "swap_s_mean": statistics.mean(r.swap.seconds for r in results if r.swap.previous != r.model)
        if swapped
        else None,
        "max_ttft_s": max(r.time_to_first_token for r in results),
    }


def _server(artifact: Path, max_batch_size: int, threads: int | None, max_wait: float, cross_variant: bool = False):
    """`moeconsol serve-local ARTIFACT --port P` in a subprocess (as it is deployed: the
    clients' threads do not share its interpreter); returns (base url, stop function)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeconsol",
            "serve-local",
            str(artifact),
            "--port",
            str(port),
            "--max-batch-size",
            str(max_batch_size),
            "--max-wait",
            str(max_wait),
            *(["--cross-variant-batching"] if cross_variant else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            httpx.get(f"{url}/v1/models", timeout=5).raise_for_status()
            return url, stop
        except httpx.HTTPError:
            if proc.poll() is not None or time.time() > deadline:
                stop()
                raise RuntimeError("serve-local did not start") from None
            time.sleep(0.2)


def concurrency(
    rt: Runtime,
    artifact: Path,
    models: list[str],
    tokens: int,
    requests: int,
    levels: list[int],
    max_batch_size: int,
    prompt: str = PROMPT,
    threads: int | None = None,
    max_wait: float = DEFAULT_MAX_WAIT,
    repeats: int = 3,
    modes: tuple[str, ...] = ("swap",),
) -> dict:
    """Throughput of `requests` greedy requests (alternating models) at each concurrency level
    against one-at-a-time decoding of the same requests, for a serve-local per mode ("swap",
    "cross-variant"), all started up front. The machine is shared and its load moves, so at
    each level one-at-a-time decoding and then every mode's concurrent run are repeated
    `repeats` times in turn; a speedup is the median of the ratios within a repeat (and
    cross-variant vs swap the median of their ratios)."""
    import httpx

    prompts = [f"{prompt} {i}" for i in range(requests)]
    order = [(models[i % len(models)], p) for i, p in enumerate(prompts)]
    settings = GenerationSettings(max_new_tokens=tokens)
    complete(rt, models[0], prompts[0], settings)  # warm up

    def one_at_a_time() -> tuple[list, float]:
        t = time.perf_counter()
        answers = [complete(rt, m, p, settings) for m, p in order]
        return answers, sum(len(c.token_ids) for c in answers) / (time.perf_counter() - t)

    alone, _ = one_at_a_time()
    servers = {}
    rows = []
    try:
        for mode in modes:
            servers[mode] = _server(artifact, max_batch_size, threads, max_wait, cross_variant=mode == "cross-variant")
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)) as client:

            def post(url, item):
                m, p = item
                r = client.post(
                    f"{url}/v1/completions", json={"model": m, "prompt": p, "max_tokens": tokens, "temperature": 0}
                )
                r.raise_for_status()
                return r.json()

            for url, _ in servers.values():
                post(url, order[0])  # warm up the server
            for level in levels:
                runs: dict[str, list[float]] = {mode: [] for mode in modes}
                singles, same = [], {mode: requests for mode in modes}
                for _ in range(repeats):
                    singles.append(one_at_a_time()[1])
                    for mode, (url, _) in servers.items():
                        with ThreadPoolExecutor(level) as pool:
                            t = time.perf_counter()
                            answers = list(pool.map(lambda item: post(url, item), order))
                            seconds = time.perf_counter() - t
                        runs[mode].append(sum(a["usage"]["completion_tokens"] for a in answers) / seconds)
                        same[mode] = min(
                            same[mode], sum(a["choices"][0]["text"] == c.text for a, c in zip(answers, alone))
                        )
                row = {"concurrency": level, "one_at_a_time_tokens_per_s": statistics.median(singles)}
                for mode in modes:
                    row[mode] = {
                        "tokens_per_s": statistics.median(runs[mode]),
                        "speedup": statistics.median(x / y for x, y in zip(runs[mode], singles)),
                        "same_as_alone": same[mode],
                    }
                if len(modes) > 1 and "swap" in modes and "cross-variant" in modes:
                    row["cross_variant_vs_swap"] = statistics.median(
                        x / y for x, y in zip(runs["cross-variant"], runs["swap"])
                    )
                rows.append(row)
    finally:
        for _, stop in servers.values():
            stop()
    return {
        "requests": requests,
        "tokens": tokens,
        "models": models,
        "max_batch_size": max_batch_size,
        "max_wait": max_wait,
        "repeats": repeats,
        "modes": list(modes),
        "levels": rows,
    }


def batch_sweep(rt: Runtime, model: str, tokens: int, sizes: list[int], prompt: str) -> list[dict]:
    """Tokens/s of the engine alone (no HTTP) decoding `size` requests together: what decides
    the default --max-batch-size."""
    rt.activate(model)
    rows = []
    for size in sizes:
        engine = Engine(rt, max_batch_size=size)
        requests = [
            Request(model, rt.encode(model, f"{prompt} {i}"), GenerationSettings(max_new_tokens=tokens))
            for i in range(size)
        ]
        t = time.perf_counter()
        for r in requests:
            engine.admit(r)
        while engine.running():
            engine.step()
        seconds = time.perf_counter() - t
        rows.append({"batch_size": size, "tokens_per_s": sum(len(r.token_ids) for r in requests) / seconds})
    return rows


def mixed_sweep(
    artifact: Path,
    device: torch.device,
    models: list[str],
    tokens: int,
    sizes: list[int],
    prompt: str,
    repeats: int = 3,
) -> list[dict]:
    """Tokens/s of the engine alone decoding `size` requests together: one variant's batch in
    swap mode, and the same prompts alternating `models` row by row in one cross-variant batch
    (best of `repeats`, interleaved so that all see the same load), and one variant's batch in
    cross-variant mode (what the mode costs when traffic is of one variant)."""
    swap = Runtime.from_artifact(artifact, device=device)
    cross = Runtime.from_artifact(artifact, device=device, mode=ServingMode.CROSS_VARIANT)

    def run(rt: Runtime, names: list[str]) -> float:
        rt.activate(names[0])
        engine = Engine(rt, max_batch_size=len(names))
        requests = [
            Request(n, rt.encode(n, f"{prompt} {i}"), GenerationSettings(max_new_tokens=tokens))
            for i, n in enumerate(names)
        ]
        t = time.perf_counter()
        engine.admit_all(requests)
        while engine.running():
            engine.step()
        return sum(len(r.token_ids) for r in requests) / (time.perf_counter() - t)

    rows = []
    for size in sizes:
        one = [models[0]] * size
        mixed = [models[i % len(models)] for i in range(size)]
        run(swap, one), run(cross, mixed)  # warm up
        runs = [(run(swap, one), run(cross, mixed), run(cross, one)) for _ in range(repeats)]
        rows.append(
            {
                "batch_size": size,
                "swap_one_variant_tokens_per_s": max(p[0] for p in runs),
                "cross_variant_mixed_tokens_per_s": max(p[1] for p in runs),
                "cross_variant_one_variant_tokens_per_s": max(p[2] for p in runs),
                "ratio": statistics.median(p[1] / p[0] for p in runs),
                "one_variant_ratio": statistics.median(p[2] / p[0] for p in runs),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--wide", action="store_true", help="also the realistic-width bf16 family (1.2 GB checkpoints)")
    ap.add_argument("--keep", type=Path, help="with --wide: build the wide family here once and reuse it")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    ap.add_argument(
        "--max-wait",
        type=float,
        action="append",
        help=f"serve-local --max-wait (repeatable; default {DEFAULT_MAX_WAIT})",
    )
    ap.add_argument(
        "--concurrent-requests",
        type=int,
        default=16,
        help="requests per concurrency level (16: one wave at 16 clients)",
    )
    ap.add_argument(
        "--size",
        choices=["benchmark", "example"],
        default="benchmark",
        help="model shapes: this benchmark's (hidden 256) or the example family's (hidden 64)",
    )
    ap.add_argument("--only", choices=["concurrency", "mixed"], default=None, help="run only this part")
    ap.add_argument(
        "--modes",
        default="swap,cross-variant",
        help="concurrency: serve-local in these modes (swap: one variant per step, repeated per --max-wait; "
        "cross-variant: --cross-variant-batching)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own); on a shared machine 1 avoids spin-waiting for busy cores",
    )
    args = ap.parse_args()
    args.max_wait = args.max_wait or [DEFAULT_MAX_WAIT]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        size = SIZE if args.size == "benchmark" else EXAMPLE_SIZE
        paths = build(Path(tmp), size)
        rt = Runtime.from_artifact(paths["out"], device=device)
        rb = rt.resident_bytes()
        result = {
            "device": str(device),
            "dtype": str(rt.dtype),
            "threads": torch.get_num_threads(),
            "model": size,
            "bank_sizes": rt.variant_set.bank_sizes,
            "resident_bytes": rb.to_dict(),
        }
        if args.only is None:
            result.update(
                swap=swap_cost(rt, "base", "code", args.repeats),
                generation=generation_speed(rt, paths, "code", args.tokens, args.repeats),
                interleaved=[interleaved(rt, ["base", "code"], args.requests, w, 8) for w in (30.0, 0.0)],
            )
        prompt = PROMPT if size is SIZE else SHORT_PROMPT
        modes = args.modes.split(",")
        if args.only in (None, "mixed"):
            result["mixed_sweep"] = mixed_sweep(
                paths["out"], device, ["base", "code"], args.tokens, [2, 4, 8, 16, 32], prompt
            )
        if args.only != "mixed":
            result["batch_sweep"] = batch_sweep(rt, "base", args.tokens, [1, 2, 4, 8, 16, 32, 64], prompt)
            result["concurrency"] = [
                concurrency(
                    rt,
                    paths["out"],
                    ["base", "code"],
                    args.tokens,
                    args.concurrent_requests,
                    [1, 2, 4, 8, 16],
                    args.max_batch_size,
                    prompt,
                    args.threads,
                    w,
                    modes=tuple(modes),
                )
                for w in args.max_wait
            ]
        del rt
        if args.wide and args.only is None:
            wide = build_wide(args.keep or Path(tmp) / "wide")
            rt = Runtime.from_artifact(wide["out"], device=device)
            result["wide"] = {
                "model": WIDE,
                "dtype": str(rt.dtype),
                "resident_bytes": rt.resident_bytes().to_dict(),
                "swap": swap_cost(rt, "base", "ft", args.repeats),
                "generation": generation_speed(rt, wide, "ft", args.tokens, args.repeats),
            }
            del rt
    result["load_average"] = [load, os.getloadavg()[0]]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"device {result['device']} ({result['dtype']}, {result['threads']} threads); load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    for r in result.get("mixed_sweep", []):
        print(
            f"engine alone, {r['batch_size']:>2} rows: one variant (swap mode) {r['swap_one_variant_tokens_per_s']:7.1f} tok/s, "
            f"two variants alternating (cross-variant) {r['cross_variant_mixed_tokens_per_s']:7.1f} tok/s: x{r['ratio']:.2f}; "
            f"one variant in cross-variant mode {r['cross_variant_one_variant_tokens_per_s']:7.1f} tok/s: x{r['one_variant_ratio']:.2f}"
        )
    if "batch_sweep" in result:
        print(
            "engine alone, requests decoded together: "
            + ", ".join(f"{r['batch_size']}: {r['tokens_per_s']:.0f} tok/s" for r in result["batch_sweep"])
        )
    for c in result.get("concurrency", []):
        print(
            f"concurrency: {c['requests']} greedy requests of {c['tokens']} tokens over {', '.join(c['models'])}, "
            f"max batch size {c['max_batch_size']}, swap mode's max wait {c['max_wait']} s; each level {c['repeats']} times: "
            f"one-at-a-time decoding, then each mode (speedups: medians of the ratios within a repeat)"
        )
        for row in c["levels"]:
            cells = [
                f"{mode} {row[mode]['tokens_per_s']:7.1f} tok/s x{row[mode]['speedup']:.2f} "
                f"({row[mode]['same_as_alone']}/{c['requests']} as alone)"
                for mode in c["modes"]
            ]
            vs = f"; cross-variant / swap x{row['cross_variant_vs_swap']:.2f}" if "cross_variant_vs_swap" in row else ""
            print(
                f"  {row['concurrency']:>2} concurrent: one at a time {row['one_at_a_time_tokens_per_s']:6.1f} tok/s; "
                + "; ".join(cells)
                + vs
            )
    if args.only is not None:
        return
    print(
        f"tiny: resident {rb.total / 2**20:.1f} MiB (bank {rb.bank / 2**20:.1f} MiB + non-expert {rb.non_expert / 2**20:.1f} MiB), "
        f"banks {result['bank_sizes']}"
    )
    _print_swap_and_speed("tiny", "base->code", result)
    if "wide" in result:
        wb = result["wide"]["resident_bytes"]
        print(
            f"wide ({result['wide']['dtype']}): resident {wb['total'] / 2**20:.1f} MiB (bank {wb['bank'] / 2**20:.1f} MiB "
            f"+ non-expert {wb['non_expert'] / 2**20:.1f} MiB)"
        )
        _print_swap_and_speed("wide", "base->ft", result["wide"])
    for r in result["interleaved"]:
        w = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
        print(
            f"interleaved, max-wait {r['max_wait_s']} s: {r['swaps']} swaps / {r['requests']} requests; "
            f"TTFT from arrival with swap {w(r['ttft_with_swap_s'])}, without {w(r['ttft_without_swap_s'])}, worst {w(r['max_ttft_s'])}; "
            f"from dequeue with swap {w(r['service_ttft_with_swap_s'])}, without {w(r['service_ttft_without_swap_s'])}; "
            f"mean swap {w(r['swap_s_mean'])}"
        )


def _print_swap_and_speed(label: str, pair: str, result: dict) -> None:
    s, g = result["swap"], result["generation"]
    print(
        f"{label} swap {pair}: {s['bytes'] / 2**20:.2f} MiB, {s['tensors_copied']} tensors in one copy per dtype "
        f"({s['tensors_skipped']} shared, not copied): {s['swap_s'] * 1e3:.3f} ms; "
        f"the fastest plain copy of the same bytes {s['plain_copy_s'] * 1e3:.3f} ms (x{s['ratio']:.2f}; "
        f"x{s['ratio_to_same_copy']:.2f} the same kind of copy; each kind: "
        + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in s["plain_copies_s"].items())
        + ")"
    )
    print(
        f"{label} greedy {g['tokens']} tokens: runtime {g['runtime_tokens_per_s']:.2f} tok/s, "
        f"transformers {g['transformers_tokens_per_s']:.2f} tok/s (x{g['ratio']:.3f} by medians; "
        f"x{g['best_ratio']:.3f} by best runs; x{g['cpu_ratio']:.3f} by CPU time)"
    )


if __name__ == "__main__":
    main()
